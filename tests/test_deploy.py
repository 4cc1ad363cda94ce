"""lightlm.deploy: ONNX Runtime's logits checked against the PyTorch model's own forward at several shapes, the
file against onnx.checker and os.path.getsize, the int8 weights against torch's per-channel observer, the int8
model against PyTorch's top-1 classes, every error path, and a real MiniLM classifier end to end (slow)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_hf
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from lightlm import deploy
from lightlm.deploy import ExportMismatchError, MissingDeployPackageError, OnnxModel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny graphs; two threads contend on a busy 2-core machine

ROOT = Path(__file__).resolve().parents[1]


def _batch(rows: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids in [1, 100) with the first row padded (id 0, mask 0) after half its length, as a tokenizer pads."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, (length + 1) // 2:] = 0
    return ids * mask, mask


def _torch_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.fixture(scope="module")
def bert():
    return tiny_hf("bert")


@pytest.fixture(scope="module")
def exported(bert, tmp_path_factory):
    return deploy.export_onnx(bert, *_batch(3, 9), tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def int8(exported):
    return deploy.quantize_dynamic_int8(exported, exported.path.with_name("tiny-int8.onnx"),
                                        check_inputs=_batch(128, 16, seed=1))


class _DriftsWhenExported(nn.Module):
    """Eager: the classifier's logits. Traced for export: logits + 0.5 (a Python branch decided at trace time)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits + 0.5 if torch.compiler.is_exporting() else logits


# --------------------------------------------------------------------------- export and run


@pytest.mark.parametrize("rows, length", [(3, 9), (6, 14), (1, 1)])
def test_onnx_runtime_logits_match_the_pytorch_forward(bert, exported, rows, length):
    ids, mask = _batch(rows, length, seed=rows)
    torch.testing.assert_close(exported(ids, mask), _torch_logits(bert, ids, mask), atol=1e-5, rtol=0)


@settings(max_examples=12)
@given(rows=st.integers(1, 5), length=st.integers(2, 24), seed=st.integers(0, 2**16))
def test_every_batch_size_and_length_runs_like_pytorch(bert, exported, rows, length, seed):
    ids, mask = _batch(rows, length, seed)
    torch.testing.assert_close(exported(ids, mask), _torch_logits(bert, ids, mask), atol=1e-5, rtol=0)


def test_export_checks_a_second_batch_of_another_size_and_length(exported):
    assert exported.check["shapes"] == [(3, 9), (4, 8)]
    assert exported.check["max_abs_diff"] <= exported.check["atol"] == 1e-4


def test_exported_file_passes_the_onnx_checker_with_symbolic_axes(exported):
    import onnx

    onnx.checker.check_model(str(exported.path), full_check=True)
    graph = onnx.load(str(exported.path)).graph
    assert [node.name for node in graph.input] == ["input_ids", "attention_mask"]
    for node in graph.input:
        dims = node.type.tensor_type.shape.dim
        assert [dim.dim_param != "" for dim in dims] == [True, True], dims  # named, not fixed sizes
    assert [node.name for node in graph.output] == ["logits"]


def test_nbytes_is_the_size_of_the_self_contained_file(exported):
    assert exported.nbytes == os.path.getsize(exported.path)
    assert not Path(f"{exported.path}.data").exists()


def test_nbytes_counts_external_data(exported, tmp_path):
    import onnx

    onnx.save_model(onnx.load(str(exported.path)), str(tmp_path / "split.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="split.weights", size_threshold=1024)
    split = OnnxModel(tmp_path / "split.onnx")
    assert split.nbytes == os.path.getsize(tmp_path / "split.onnx") + os.path.getsize(tmp_path / "split.weights")
    assert os.path.getsize(tmp_path / "split.weights") > 512 * 32 * 4  # the weights moved out (position table alone)
    ids, mask = _batch(2, 5)
    torch.testing.assert_close(split(ids, mask), exported(ids, mask), atol=0, rtol=0)


def test_threads_default_to_torchs_and_can_be_set(exported):
    assert exported.threads == torch.get_num_threads()
    model = OnnxModel(exported.path, threads=2)
    assert model.session.get_session_options().intra_op_num_threads == 2


def test_export_runs_in_eval_mode_and_restores_every_modules_mode(tmp_path):
    model = tiny_hf("bert").train()  # dropout 0.1 on: a graph traced in train mode would not match eval logits
    model.bert.embeddings.eval()
    before = {name: module.training for name, module in model.named_modules()}
    ids, mask = _batch(2, 6)
    result = deploy.export_onnx(model, ids, mask, tmp_path / "sub" / "modes.onnx")
    assert {name: module.training for name, module in model.named_modules()} == before
    assert all(parameter.device.type == "cpu" for parameter in model.parameters())
    torch.testing.assert_close(result(ids, mask), _torch_logits(model.eval(), ids, mask), atol=1e-5, rtol=0)


def test_a_graph_that_differs_from_eager_raises_with_the_difference(bert, tmp_path):
    with pytest.raises(ExportMismatchError, match=r"differ from PyTorch's by up to 0\.5 \(atol 0\.0001") as error:
        deploy.export_onnx(_DriftsWhenExported(bert), *_batch(3, 9), tmp_path / "drift.onnx")
    assert isinstance(error.value, ValueError)
    assert (tmp_path / "drift.onnx").is_file()  # kept for inspection


def test_check_false_returns_the_graph_unchecked(bert, tmp_path):
    ids, mask = _batch(3, 9)
    result = deploy.export_onnx(_DriftsWhenExported(bert), ids, mask, tmp_path / "drift.onnx", check=False)
    assert result.check is None
    torch.testing.assert_close(result(ids, mask), _torch_logits(bert, ids, mask) + 0.5, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_model_is_refused_not_moved(tmp_path):
    model = tiny_hf("bert").cuda()
    with pytest.raises(ValueError, match=r"model has tensors on \['cuda:0'\]; .* call model.cpu\(\)"):
        deploy.export_onnx(model, *_batch(2, 4), tmp_path / "cuda.onnx")
    assert next(model.parameters()).device.type == "cuda"


# --------------------------------------------------------------------------- int8


def test_int8_top1_agrees_with_the_pytorch_model(bert, int8):
    ids, mask = _batch(200, 12, seed=7)
    agreement = (int8(ids, mask).argmax(-1) == _torch_logits(bert, ids, mask).argmax(-1)).double().mean().item()
    assert agreement >= 0.95
    assert int8.check["n"] == 128 and int8.check["agreement"] >= int8.check["min_agreement"] == 0.9
    assert 0 < int8.check["max_abs_diff"] < 0.01  # the tiny model's logits are about 0.01


def test_int8_quantizes_every_linear_layer(bert, int8):
    import onnx

    nodes = [node.op_type for node in onnx.load(str(int8.path)).graph.node]
    assert nodes.count("MatMulInteger") == sum(isinstance(module, nn.Linear) for module in bert.modules())
    assert "DynamicQuantizeLinear" in nodes  # activations quantized at run time


def _initializer(path, name) -> torch.Tensor:
    import onnx
    from onnx import numpy_helper

    found = {tensor.name: tensor for tensor in onnx.load(str(path)).graph.initializer}
    return torch.from_numpy(numpy_helper.to_array(found[name]).copy())


def _torch_int8(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in [-127, 127] per output row (or per tensor), with torch's own observer."""
    rows = weight.detach() if per_channel else weight.detach().reshape(1, -1)
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, quant_min=-127, quant_max=127,
                                        qscheme=torch.per_channel_symmetric)
    observer(rows)
    scale, _ = observer.calculate_qparams()
    return torch.round(rows / scale[:, None]).reshape(weight.shape), scale


def test_int8_weights_are_symmetric_per_output_channel(bert, int8):
    q, scale = _torch_int8(bert.classifier.weight, per_channel=True)  # (labels, hidden)
    torch.testing.assert_close(_initializer(int8.path, "model.classifier.weight_scale"), scale.float(), rtol=1e-6,
                               atol=0)
    stored = _initializer(int8.path, "model.classifier.weight_quantized")  # (hidden, labels): the MatMul's B
    assert stored.dtype == torch.int8 and torch.equal(stored.T.float(), q)


def test_per_tensor_int8_from_a_path_has_one_scale(bert, exported, tmp_path):
    result = deploy.quantize_dynamic_int8(str(exported.path), tmp_path / "per-tensor.onnx",
                                          check_inputs=_batch(64, 10, seed=2), per_channel=False)
    q, scale = _torch_int8(bert.classifier.weight, per_channel=False)
    torch.testing.assert_close(_initializer(result.path, "model.classifier.weight_scale").reshape(1),
                               scale.float(), rtol=1e-6, atol=0)
    assert torch.equal(_initializer(result.path, "model.classifier.weight_quantized").T.float(), q)


def test_int8_file_is_smaller_and_counted_exactly(exported, int8):
    assert int8.nbytes == os.path.getsize(int8.path)
    assert int8.nbytes < 0.8 * exported.nbytes  # the tiny model's LayerNorms and biases stay fp32


def test_int8_below_min_agreement_raises(exported, tmp_path, monkeypatch):
    original = OnnxModel.__call__

    def flipped(self, input_ids, attention_mask):  # the int8 file's logits negated: every top-1 class changes
        logits = original(self, input_ids, attention_mask)
        return -logits if self.path.name == "flipped.onnx" else logits

    monkeypatch.setattr(OnnxModel, "__call__", flipped)
    with pytest.raises(ExportMismatchError, match=r"agrees with the fp32 model's on \d\.\d% of the 32 check rows, "
                                                  r"below min_agreement 90\.0%"):  # < 10%: ties stay ties
        deploy.quantize_dynamic_int8(exported, tmp_path / "flipped.onnx", check_inputs=_batch(32, 8))
    assert (tmp_path / "flipped.onnx").is_file()


# --------------------------------------------------------------------------- errors


def _export_call(bert, tmp_path, **override):
    arguments = {"model": bert, "input_ids": _batch(2, 5)[0], "attention_mask": _batch(2, 5)[1],
                 "path": tmp_path / "x.onnx"}
    arguments.update(override)
    return deploy.export_onnx(arguments.pop("model"), arguments.pop("input_ids"), arguments.pop("attention_mask"),
                              arguments.pop("path"), **arguments)


@pytest.mark.parametrize("override, error, message", [
    ({"model": "bert"}, TypeError, "model must be a torch.nn.Module, got str"),
    ({"input_ids": torch.ones(2, 5)}, TypeError, "input_ids must be an integer tensor"),
    ({"input_ids": torch.ones(5, dtype=torch.long)}, ValueError, "input_ids must be 2-D"),
    ({"attention_mask": torch.ones(2, 4, dtype=torch.long)}, ValueError, r"attention_mask must have the shape"),
    ({"attention_mask": torch.ones(2, 5, dtype=torch.long, device="meta")}, ValueError, "attention_mask is on meta"),
    ({"input_ids": torch.ones(2, 1, dtype=torch.long), "attention_mask": torch.ones(2, 1, dtype=torch.long)},
     ValueError, r"input_ids must have a row and at least 2 token\(s\) per row"),
    ({"input_ids": torch.ones(0, 5, dtype=torch.long), "attention_mask": torch.ones(0, 5, dtype=torch.long)},
     ValueError, r"input_ids must have a row"),
    ({"path": 5}, TypeError, "path must be a str or os.PathLike, got int"),
    ({"path": "model.txt"}, ValueError, "path must name a .onnx file"),
    ({"atol": -1e-4}, ValueError, "atol must be >= 0"),
    ({"atol": True}, TypeError, "atol must be a real number"),
    ({"check": "yes"}, TypeError, "check must be True or False"),
    ({"threads": 0}, ValueError, "threads must be >= 1"),
])
def test_export_rejects_bad_arguments(bert, tmp_path, override, error, message):
    with pytest.raises(error, match=message):
        _export_call(bert, tmp_path, **override)
    assert not (tmp_path / "x.onnx").exists()


def test_export_refuses_a_model_off_the_cpu_without_moving_it(tmp_path):
    model = tiny_hf("bert").to("meta")
    with pytest.raises(ValueError, match=r"model has tensors on \['meta'\]; export_onnx does not move models"):
        _export_call(model, tmp_path)
    assert next(model.parameters()).device.type == "meta"


def test_export_refuses_a_model_without_logits(bert, tmp_path):
    with pytest.raises(TypeError, match="model must return logits .* got BaseModelOutputWithPooling"):
        _export_call(bert.bert, tmp_path)  # the bare encoder


def test_onnx_model_rejects_bad_arguments(exported, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        OnnxModel(3)
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        OnnxModel(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        OnnxModel(exported.path, threads=0)
    with pytest.raises(TypeError, match="threads must be an int"):
        OnnxModel(exported.path, threads=True)
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other", [x],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, ["n"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
              str(tmp_path / "other.onnx"))
    with pytest.raises(ValueError, match=r"path must hold a graph with inputs \('input_ids', 'attention_mask'\)"):
        OnnxModel(tmp_path / "other.onnx")


def test_onnx_model_call_rejects_bad_inputs(exported):
    ids, mask = _batch(2, 5)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        exported(ids.float(), mask)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        exported(ids, mask[:, :4])
    with pytest.raises(ValueError, match="input_ids is on meta"):
        exported(ids.to("meta"), mask)


@pytest.mark.parametrize("override, error, message", [
    ({"model": 3}, TypeError, "model must be an OnnxModel or the path of a .onnx file, got int"),
    ({"out_path": "int8.bin"}, ValueError, "out_path must name a .onnx file"),
    ({"check_inputs": torch.ones(2, 3, dtype=torch.long)}, TypeError, r"check_inputs must be a pair"),
    ({"check_inputs": (torch.ones(2, 3), torch.ones(2, 3))}, TypeError, "input_ids must be an integer tensor"),
    ({"min_agreement": 1.5}, ValueError, r"min_agreement must be in \[0, 1\], got 1.5"),
    ({"per_channel": 1}, TypeError, "per_channel must be True or False"),
    ({"reduce_range": "no"}, TypeError, "reduce_range must be True or False"),
])
def test_quantize_rejects_bad_arguments(exported, tmp_path, override, error, message):
    arguments = {"model": exported, "out_path": tmp_path / "int8.onnx", "check_inputs": _batch(2, 5)}
    arguments.update(override)
    with pytest.raises(error, match=message):
        deploy.quantize_dynamic_int8(arguments.pop("model"), arguments.pop("out_path"), **arguments)
    assert not (tmp_path / "int8.onnx").exists()


def test_quantize_refuses_to_overwrite_its_source(exported):
    with pytest.raises(ValueError, match="out_path must differ from the fp32 model's path"):
        deploy.quantize_dynamic_int8(exported, exported.path, check_inputs=_batch(2, 5))


# --------------------------------------------------------------------------- packages


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_a_missing_package_names_the_pinned_pip_line(exported, bert, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes ``import <missing>`` raise ImportError
    line = r"pip install onnx==1\.23\.2 onnxscript==0\.7\.2 onnxruntime==1\.31\.1"
    with pytest.raises(MissingDeployPackageError, match=rf"needs .*{missing}.*{line}") as error:
        _export_call(bert, tmp_path)
    assert isinstance(error.value, ImportError)
    if missing != "onnxscript":  # running a graph needs onnxruntime, its size onnx; neither needs onnxscript
        with pytest.raises(MissingDeployPackageError, match=line):
            OnnxModel(exported.path).nbytes


def test_pins_are_the_ones_in_requirements_txt():
    requirements = (ROOT / "requirements.txt").read_text().split()
    assert [f"{name}=={version}" for name, version in deploy.PINS.items()] == \
        [line for line in requirements if line.split("==")[0] in deploy.PINS]


def test_importing_the_module_imports_no_onnx_package():
    code = ("import sys, lightlm.deploy; "
            "print(sorted(name for name in ('onnx', 'onnxscript', 'onnxruntime') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the real MiniLM (slow)

SENTENCES = ["a gripping, beautifully acted drama", "the plot never recovers from its dull first hour",
             "funny, warm and surprisingly wise", "a tedious mess with nothing to say",
             "one of the best films of the year", "the jokes fall flat and the pacing drags",
             "an ambitious film that mostly succeeds", "i walked out halfway through",
             "a charming cast lifts a thin script", "visually stunning but emotionally empty",
             "smart, sharp and never boring", "a sequel nobody asked for",
             "the director's most personal work yet", "clumsy dialogue sinks an interesting premise",
             "it will leave you smiling for days", "overlong, overwrought and overrated"]


def test_minilm_classifier_exports_and_quantizes_within_bounds(minilm, tmp_path):
    import transformers

    tokenizer, encoder = minilm
    config = copy.deepcopy(encoder.config)
    config.num_labels = 2
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.bert.load_state_dict(encoder.state_dict())
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    expected = _torch_logits(model, ids, mask)
    fp32 = deploy.export_onnx(model, ids[:4], mask[:4], tmp_path / "minilm.onnx")
    torch.testing.assert_close(fp32(ids, mask), expected, atol=1e-4, rtol=0)
    int8 = deploy.quantize_dynamic_int8(fp32, tmp_path / "minilm-int8.onnx", check_inputs=(ids, mask))
    assert (int8(ids, mask).argmax(-1) == expected.argmax(-1)).double().mean() >= 0.9
    assert 0.24 < int8.nbytes / fp32.nbytes < 0.3  # int8 weights and embeddings, fp32 scales, biases and norms
