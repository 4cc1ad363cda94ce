"""lightlm.quant_linear: integer storage checked against torch's fake-quantize ops and observers, the int8 matmul
against float64 sums of the same integers, W8A8 against torchao, quantize_model on real and tiny Hugging Face
models, and the bytes a quantized model takes on disk (safetensors)."""

import copy
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver

from lightlm.quant_linear import (QuantLinear, dynamic_int8_linear, int8_matmul, quantize_model,
                                  quantize_per_row)

pytestmark = [pytest.mark.filterwarnings("ignore:Please use quant_min and quant_max"),
              pytest.mark.usefixtures("one_thread")]  # small tensors; two threads contend on a busy 2-core machine


def _linear(in_features=24, out_features=10, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _torch_fake_quantized(weight, bits, group_size, symmetric) -> torch.Tensor:
    """dequantize(quantize(W)) with torch's own observer and fake-quantize op, one (s, z) per row or group."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = weight.detach().reshape(-1, group_size or weight.shape[1])
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, quant_min=qmin, quant_max=qmax,
                                        qscheme=torch.per_channel_symmetric if symmetric else torch.per_channel_affine)
    observer(rows)
    scale, zero_point = observer.calculate_qparams()
    fake = torch.fake_quantize_per_channel_affine(rows, scale, zero_point.to(torch.int32), 0, qmin, qmax)
    return fake.reshape(weight.shape)


# --------------------------------------------------------------------------- the int8 matmul


@given(m=st.integers(1, 20), k=st.integers(1, 40), n=st.integers(1, 20), a_transposed=st.booleans(),
       b_transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_matmul_equals_float64_sums_of_the_same_integers(m, k, n, a_transposed, b_transposed, seed):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (k, m) if a_transposed else (m, k), dtype=torch.int8, generator=generator)
    b = torch.randint(-128, 128, (n, k) if b_transposed else (k, n), dtype=torch.int8, generator=generator)
    a, b = a.t() if a_transposed else a, b.t() if b_transposed else b  # strided views, as W.t() of a Linear
    ours = int8_matmul(a, b)
    assert ours.dtype == torch.int32
    assert torch.equal(ours.to(torch.float64), a.to(torch.float64) @ b.to(torch.float64))


def test_int8_matmul_survives_torchs_size_one_stride_bug():
    # torch 2.13's CPU _int_mm reads the stride of a size-1 dimension as a leading dimension: W.t() of a
    # one-column W (strides (1, 1)) gives wrong sums there; int8_matmul copies such operands first
    x = torch.tensor([[3]], dtype=torch.int8)
    weight = torch.tensor([[2], [-5]], dtype=torch.int8)  # (out=2, in=1)
    assert int8_matmul(x, weight.t()).tolist() == [[6, -15]]
    layer = QuantLinear.from_linear(_linear(1, 3), activations="int8")
    torch.testing.assert_close(layer(torch.tensor([[0.5]])), _linear(1, 3)(torch.tensor([[0.5]])), rtol=0.02,
                               atol=0.02)


def test_int8_matmul_reaches_the_extremes_without_overflow():
    a = torch.full((2, 4096), -128, dtype=torch.int8)
    assert int8_matmul(a, a.t())[0, 0].item() == 4096 * 128 * 128


def test_int8_matmul_rejects_bad_inputs():
    a = torch.zeros(3, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="a must be an int8 tensor"):
        int8_matmul(a.float(), a.t())
    with pytest.raises(TypeError, match="b must be an int8 tensor"):
        int8_matmul(a, a.t().to(torch.uint8))
    with pytest.raises(ValueError, match="a's columns must match b's rows"):
        int8_matmul(a, a)
    with pytest.raises(ValueError, match="b must be 2-D"):
        int8_matmul(a, torch.zeros(4, dtype=torch.int8))
    wide = torch.zeros(1, 2**17, dtype=torch.int8)
    with pytest.raises(ValueError, match="could overflow"):
        int8_matmul(wide, wide.t())


# --------------------------------------------------------------------------- per-row int8 and W8A8


def test_quantize_per_row_is_torchs_symmetric_per_channel_int8():
    x = torch.randn(9, 33, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 5, 9)[:, None]
    x[3] = 0.0  # an all-zero row: scale eps, codes 0
    codes, scale = quantize_per_row(x)
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(x)
    their_scale, their_zero = observer.calculate_qparams()
    torch.testing.assert_close(scale.flatten(), their_scale, rtol=0, atol=0)
    fake = torch.fake_quantize_per_channel_affine(x, their_scale, their_zero.to(torch.int32), 0, -128, 127)
    assert codes.dtype == torch.int8
    assert torch.equal(codes.to(torch.float32) * scale, fake)


def test_quantize_per_row_rejects_bad_inputs():
    with pytest.raises(ValueError, match="finite"):
        quantize_per_row(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="finite"):
        quantize_per_row(torch.tensor([[1.0], [float("-inf")]]))
    with pytest.raises(ValueError, match="at least one column"):
        quantize_per_row(torch.zeros(2, 0))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_per_row(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_row(torch.zeros(3))


def test_w8a8_accumulators_and_outputs_are_the_integer_arithmetic_done_in_float64():
    linear = _linear(48, 16)
    x = torch.randn(5, 7, 48, generator=torch.Generator().manual_seed(2)) * 3
    layer = QuantLinear.from_linear(linear, activations="int8")
    # independent codes: torch's fake-quantize (per token for x, per output row for W) divided by the scale
    fake_w = _torch_fake_quantized(linear.weight, 8, None, True)
    w_scale = layer.scale.flatten()
    q = torch.round(fake_w / w_scale[:, None])
    x2 = x.reshape(-1, 48)
    a = x2.abs().amax(dim=1) / 127.5
    p = torch.round(torch.fake_quantize_per_channel_affine(x2, a, torch.zeros(35, dtype=torch.int32), 0, -128,
                                                           127) / a[:, None])
    accumulators = p.to(torch.float64) @ q.to(torch.float64).t()  # Σ_j P_tj Q_ij, exactly, in float64
    ours = int8_matmul(p.to(torch.int8), layer.codes.t())
    assert torch.equal(ours.to(torch.float64), accumulators)
    expected = accumulators.to(torch.float32) * a[:, None] * w_scale + linear.bias.detach()
    assert torch.equal(layer(x), expected.reshape(5, 7, 16))
    torch.testing.assert_close(layer(x), linear(x), rtol=0.05, atol=0.05)


def test_w8a8_is_torchaos_int8_dynamic_activation_int8_weight():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    linear = _linear(64, 32)
    theirs = copy.deepcopy(linear)
    quantize_(theirs, Int8DynamicActivationInt8WeightConfig())
    ours = QuantLinear.from_linear(linear, activations="int8")
    assert torch.equal(ours.codes, theirs.weight.qdata)
    assert torch.equal(ours.scale.flatten(), theirs.weight.scale.flatten())
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        difference = (ours(x) - theirs(x)).abs().max().item()
    assert difference <= 1e-6  # measured: 0.0 (the same integers, the same float operations)


def test_dynamic_int8_linear_rejects_a_width_mismatch():
    codes, scale = quantize_per_row(torch.randn(4, 8))
    with pytest.raises(ValueError, match="x has width 6"):
        dynamic_int8_linear(torch.randn(2, 6), codes, scale)


# --------------------------------------------------------------------------- QuantLinear (weight-only)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_features, group_size", [(24, None), (25, None), (24, 8)])
def test_forward_is_a_linear_holding_torchs_fake_quantized_weight(bits, symmetric, in_features, group_size):
    linear = _linear(in_features, 10)
    layer = QuantLinear.from_linear(linear, bits=bits, group_size=group_size, symmetric=symmetric)
    reference = copy.deepcopy(linear)
    with torch.no_grad():
        reference.weight.copy_(_torch_fake_quantized(linear.weight, bits, group_size, symmetric))
    assert torch.equal(layer.dequantized_weight(), reference.weight)
    x = torch.randn(3, 4, in_features, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


@given(out_features=st.integers(1, 6), groups=st.integers(1, 3), group_width=st.integers(1, 9),
       grouped=st.booleans(), bits=st.integers(2, 8), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_stored_codes_decode_to_torchs_fake_quantized_weight_for_any_shape(out_features, groups, group_width,
                                                                            grouped, bits, symmetric, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(groups * group_width, out_features)
    group_size = group_width if grouped else None
    layer = QuantLinear.from_linear(linear, bits=bits, group_size=group_size, symmetric=symmetric)
    codes = layer.int_codes()
    assert codes.shape == linear.weight.shape
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert torch.equal(layer.dequantized_weight(), _torch_fake_quantized(linear.weight, bits, group_size, symmetric))


@pytest.mark.parametrize("bits, dtype, columns", [(8, torch.int8, 25), (5, torch.int8, 25), (4, torch.uint8, 13),
                                                  (2, torch.uint8, 13)])
def test_storage_is_real_small_tensors(bits, dtype, columns):
    layer = QuantLinear.from_linear(_linear(25, 10), bits=bits, symmetric=False)
    state = layer.state_dict()
    assert set(state) == {"codes", "scale", "zero_point", "bias"}
    assert state["codes"].dtype == dtype and state["codes"].shape == (10, columns)
    assert state["scale"].dtype == torch.float32 and state["zero_point"].dtype == torch.int8
    assert layer.nbytes() == 10 * columns + 10 * 4 + 10 + 10 * 4
    assert "zero_point" not in QuantLinear.from_linear(_linear(), symmetric=True).state_dict()
    assert "bias" not in QuantLinear.from_linear(_linear(bias=False)).state_dict()
    assert "bits=" in repr(layer) and "group_size=None" in repr(layer)


def test_state_dict_loads_into_a_fresh_layer():
    layer = QuantLinear.from_linear(_linear(24, 10), bits=4, group_size=8, symmetric=False)
    fresh = QuantLinear(24, 10, bits=4, group_size=8, symmetric=False)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(5, 24)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_runs_in_the_inputs_dtype(dtype):
    linear = _linear()
    layer = QuantLinear.from_linear(linear, bits=4)
    x = torch.randn(3, 24).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    expected = nn.functional.linear(x, layer.dequantized_weight().to(dtype), linear.bias.detach().to(dtype))
    assert torch.equal(out, expected)
    w8a8 = QuantLinear.from_linear(linear, activations="int8")
    assert w8a8(x).dtype == dtype


def test_from_linear_rejects_bad_arguments():
    linear = _linear(24, 10)
    with pytest.raises(ValueError, match=r"group_size=7 does not divide .*in_features=24"):
        QuantLinear.from_linear(linear, group_size=7)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        QuantLinear.from_linear(linear, group_size=0)
    with pytest.raises(TypeError, match="group_size must be an int"):
        QuantLinear.from_linear(linear, group_size=8.0)
    for bits in (1, 9):
        with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
            QuantLinear.from_linear(linear, bits=bits)
    with pytest.raises(TypeError, match="bits must be an int"):
        QuantLinear.from_linear(linear, bits=True)
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        QuantLinear.from_linear(linear, symmetric=1)
    with pytest.raises(ValueError, match="activations must be one of"):
        QuantLinear.from_linear(linear, activations="int4")
    with pytest.raises(ValueError, match="W8A8"):
        QuantLinear.from_linear(linear, bits=4, activations="int8")
    with pytest.raises(TypeError, match="must be an nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1))
    for bad in (float("nan"), float("inf")):
        broken = _linear(24, 10)
        with torch.no_grad():
            broken.weight[2, 3] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            QuantLinear.from_linear(broken)


def test_forward_rejects_bad_inputs():
    layer = QuantLinear.from_linear(_linear(24, 10))
    with pytest.raises(ValueError, match="x has width 23"):
        layer(torch.randn(2, 23))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.zeros(2, 24, dtype=torch.int64))


# --------------------------------------------------------------------------- quantize_model


def _tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32)
    return BertModel(config).eval()


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_quantize_model_replaces_every_linear_and_reports_bytes():
    model = _tiny_bert()
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    fp32_bytes = sum(4 * (m.in_features + 1) * m.out_features for m in map(model.get_submodule, names))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    report = quantize_model(model, bits=8)
    assert report["replaced"] == names and report["skipped"] == []
    assert not any(isinstance(module, nn.Linear) for module in model.modules())
    assert report["bytes_before"] == fp32_bytes
    assert report["bytes_after"] == sum(module.nbytes() for module in model.modules()
                                        if isinstance(module, QuantLinear))
    with torch.no_grad():
        after = model(input_ids=ids).last_hidden_state
    assert ((after - before).norm() / before.norm()).item() < 0.01


def test_quantize_model_skips_the_tied_output_head_by_default():
    model = _tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = quantize_model(model, bits=4, group_size=16)
    assert report["skipped"] == ["lm_head"] and isinstance(model.lm_head, nn.Linear)
    assert len(report["replaced"]) == 2 * 7
    everything = _tiny_llama()
    assert quantize_model(everything, skip=())["skipped"] == [] and isinstance(everything.lm_head, QuantLinear)


def test_quantize_model_skips_names_and_suffixes():
    model = _tiny_bert()
    report = quantize_model(model, skip=["query", "encoder.layer.0.output.dense", "pooler.dense"])
    assert report["skipped"] == sorted(["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query",
                                        "encoder.layer.0.output.dense", "pooler.dense"])
    assert isinstance(model.encoder.layer[1].attention.self.query, nn.Linear)
    assert isinstance(model.encoder.layer[1].output.dense, QuantLinear)


def test_quantize_model_rejects_bad_arguments_before_changing_anything():
    model = _tiny_bert()
    with pytest.raises(ValueError, match=r"'querry' names no nn.Linear.*query, value"):
        quantize_model(model, skip=["querry"])
    with pytest.raises(TypeError, match="skip entries must be module names"):
        quantize_model(model, skip=[3])
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the input width of "
                                         r"encoder.layer.0.attention.self.query \(in_features=64\)"):
        quantize_model(model, group_size=48)
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="encoder.layer.1.intermediate.dense has NaN or inf"):
        quantize_model(model)
    assert not any(isinstance(module, QuantLinear) for module in model.modules())
    with pytest.raises(ValueError, match="bits must be in"):
        quantize_model(model, bits=16)
    with pytest.raises(ValueError, match="has no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="itself an nn.Linear"):
        quantize_model(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        quantize_model("bert")


# --------------------------------------------------------------------------- real models


def _minilm_batch(tokenizer):
    texts = ["A quiet, moving film about memory and loss.", "The plot makes no sense and the acting is wooden.",
             "Quantization stores each weight in eight bits.", "I would watch it again tomorrow."]
    return tokenizer(texts, return_tensors="pt", padding=True)


def _relative_error(model, reference, batch) -> float:
    with torch.no_grad():
        ours, theirs = model(**batch).last_hidden_state, reference(**batch).last_hidden_state
    real = batch["attention_mask"].bool()  # padding positions carry no meaning
    return ((ours - theirs)[real].norm() / theirs[real].norm()).item()


def test_quantized_minilm_stays_close_to_fp32_and_equals_torchs_fake_quantized_weights(minilm):
    tokenizer, model = minilm
    batch = _minilm_batch(tokenizer)
    int8 = copy.deepcopy(model)
    report = quantize_model(int8, bits=8)
    assert len(report["replaced"]) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    assert _relative_error(int8, model, batch) < 0.05  # measured 0.028
    int4 = copy.deepcopy(model)
    quantize_model(int4, bits=4, group_size=32)
    assert _relative_error(int4, model, batch) < 0.4  # measured 0.23
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in report["replaced"]:
            weight = reference.get_submodule(name).weight
            weight.copy_(_torch_fake_quantized(weight, 8, None, True))
    assert _relative_error(int8, reference, batch) == 0.0


def test_w8a8_minilm_matches_torchao(minilm):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    tokenizer, model = minilm
    batch = _minilm_batch(tokenizer)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(ours, activations="int8")
    quantize_(theirs, Int8DynamicActivationInt8WeightConfig())
    with torch.inference_mode():
        difference = (ours(**batch).last_hidden_state - theirs(**batch).last_hidden_state).abs().max().item()
    assert difference <= 1e-5  # measured: 0.0
    assert _relative_error(ours, model, batch) < 0.1  # measured 0.05


@pytest.mark.parametrize("bits, ratio", [(8, 0.25), (4, 0.125)])
def test_saved_quantized_minilm_is_a_fraction_of_fp32_on_disk(minilm, tmp_path, bits, ratio):
    from safetensors.torch import save_file

    _, model = minilm
    quantized = copy.deepcopy(model)
    report = quantize_model(quantized, bits=bits)
    layers = tuple(f"{name}." for name in report["replaced"])

    def layer_bytes(m, path) -> int:
        save_file({k: v.contiguous() for k, v in m.state_dict().items() if k.startswith(layers)}, path)
        return os.path.getsize(path)

    fp32, small = layer_bytes(model, tmp_path / "fp32.safetensors"), layer_bytes(quantized, tmp_path / "q.safetensors")
    assert fp32 > report["bytes_before"] and small > report["bytes_after"]  # the tensors plus a JSON header
    assert ratio < small / fp32 < ratio * 1.05  # int8 measured 0.255, int4 0.130 (scales and biases stay fp32)
    save_file(quantized.state_dict(), tmp_path / "model.safetensors")
    save_file(model.state_dict(), tmp_path / "model_fp32.safetensors")
    whole, whole_fp32 = (os.path.getsize(tmp_path / name) for name in ("model.safetensors", "model_fp32.safetensors"))
    # the rest (embeddings: 11.9M of MiniLM's 22.7M parameters, LayerNorms) is saved as it was, in fp32
    assert abs(whole - (whole_fp32 - fp32 + small)) < 16_384  # up to the JSON headers' lengths


def test_quantized_smollm2_skips_the_tied_lm_head(smollm2):
    tokenizer, model = smollm2
    quantized = copy.deepcopy(model)
    report = quantize_model(quantized, bits=8)
    assert report["skipped"] == ["lm_head"] and len(report["replaced"]) == 30 * 7
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight
    assert report["bytes_after"] / report["bytes_before"] < 0.26
    batch = tokenizer(["The capital of France is", "Quantization stores each weight of a language model in "
                       "fewer bits, which"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, theirs = quantized(**batch).logits, model(**batch).logits
    real = batch["attention_mask"].bool()
    log_p, log_q = theirs.log_softmax(-1)[real], ours.log_softmax(-1)[real]
    assert (log_p.exp() * (log_p - log_q)).sum(-1).mean().item() < 0.02  # KL(fp32 ‖ int8), measured 0.007
    assert (ours.argmax(-1) == theirs.argmax(-1))[real].float().mean().item() >= 0.9  # measured 1.0


# --------------------------------------------------------------------------- set_weight, and LoRA over int8


@pytest.mark.parametrize("bits, group_size, symmetric", [(8, None, True), (4, 8, False)])
def test_set_weight_stores_torchs_fake_quantized_new_weight(bits, group_size, symmetric):
    layer = QuantLinear.from_linear(_linear(24, 10), bits=bits, group_size=group_size, symmetric=symmetric)
    bias = layer.bias.clone()
    new = torch.randn(10, 24, generator=torch.Generator().manual_seed(7))
    layer.set_weight(new)
    assert torch.equal(layer.dequantized_weight(), _torch_fake_quantized(new, bits, group_size, symmetric))
    assert torch.equal(layer.bias, bias)  # only the weight changes
    with pytest.raises(ValueError, match=r"shape \(24, 10\)"):
        layer.set_weight(new.T)
    with pytest.raises(TypeError, match="weight"):
        layer.set_weight(new.to(torch.int64))


def test_lora_over_an_int8_base_adds_s_ba_to_the_dequantized_layer_and_merges_by_rounding():
    from lightlm import lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    quantize_model(model, bits=8, skip=[])
    lora.add_lora(model, ["0", "2"], r=2, alpha=4)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 16)
    base_w = layer.base.dequantized_weight()
    expected = x @ base_w.T + layer.base.bias + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    model(x).sum().backward()  # gradients reach the lower layer's adapter through the int8 base
    assert model[0].lora_B.weight.grad.abs().sum() > 0
    delta = 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    lora.merge_lora(model)
    assert torch.equal(layer.base.dequantized_weight(), _torch_fake_quantized(base_w + delta.detach(), 8, None, True))
