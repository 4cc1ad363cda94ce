"""lightlm.lora_io against PEFT 0.21.2 both ways: an adapter lightlm saves loads with PeftModel.from_pretrained
and one PEFT saves loads with load_adapter, with equal outputs and the same file keys; PEFT's LoraConfig reads our
config back; the file size against the safetensors layout (8-byte header length + header + raw float32 data)."""

import copy
import json
import struct

import pytest
import torch
from conftest import tiny_hf
from torch import nn

from lightlm.lora import add_lora, lora_layers, lora_settings
from lightlm.lora_io import adapter_nbytes, load_adapter, save_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

CASES = {  # (model, target_modules, modules_to_save, rslora, task_type)
    "bert-classifier": ("bert", ["query", "value"], ["classifier"], False, "SEQ_CLS"),
    "llama-regex-rslora": ("llama", r".*\.(q|v)_proj", None, True, "CAUSAL_LM"),
    "gpt2-conv1d": ("gpt2", ["c_attn"], None, False, None),
}


def _tiny(kind: str) -> nn.Module:
    return tiny_hf(kind)


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(parameters, seed: int = 5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _ours(case: str):
    kind, targets, saves, rslora, _ = CASES[case]
    base = _tiny(kind)
    model = copy.deepcopy(base)
    add_lora(model, targets, r=4, alpha=8, rslora=rslora, modules_to_save=saves)
    _perturb(p for p in model.parameters() if p.requires_grad)  # nonzero B, a changed head
    return base, model


def _theirs(case: str):
    kind, targets, saves, rslora, task = CASES[case]
    base = _tiny(kind)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, task_type=task,
                             modules_to_save=saves and list(saves),  # a copy: PEFT appends to it for SEQ_CLS
                             fan_in_fan_out=kind == "gpt2")
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    _perturb(p for p in model.parameters() if p.requires_grad)
    return base, model


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_what_lightlm_saves(case, tmp_path):
    base, ours = _ours(case)
    folder = save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny", task_type=CASES[case][4])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours))
    config = peft.PeftConfig.from_pretrained(folder)
    assert (config.r, config.lora_alpha, config.use_rslora, config.task_type) == (4, 8, CASES[case][3], CASES[case][4])
    assert config.fan_in_fan_out == (CASES[case][0] == "gpt2")


@pytest.mark.parametrize("case", list(CASES))
def test_lightlm_loads_what_peft_saves_with_the_same_keys(case, tmp_path):
    base, theirs = _theirs(case)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours), _logits(theirs))
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == theirs.get_nb_trainable_parameters()[0]
    save_adapter(ours, tmp_path / "ours", task_type=CASES[case][4])
    their_keys = safetensors_torch.load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert set(safetensors_torch.load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(their_keys)


def test_lightlm_round_trip_and_settings(tmp_path):
    base, ours = _ours("bert-classifier")
    save_adapter(ours, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(ours))
    assert lora_settings(loaded)["saved_modules"] == ["classifier"] and len(lora_layers(loaded)) == 4
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["query", "value"]


def test_adapter_bytes_follow_the_safetensors_layout(tmp_path):
    _, ours = _ours("bert-classifier")
    save_adapter(ours, tmp_path)
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (header_length,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header size, JSON header, raw tensors
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert adapter_nbytes(tmp_path) == len(data) == 8 + header_length + 4 * trainable  # float32: 4 bytes each


def _rewrite_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "IA3"}, "peft_type must be 'LORA', got 'IA3'"),
    ({"use_dora": True}, "does not implement: use_dora=True"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"rank_pattern": {"query": 2}}, "rank_pattern"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported"),
    ({"r": 2}, "shapes differ"),
    ({"target_modules": None}, "names no target_modules"),
])
def test_load_rejects_unsupported_configs(changes, message, tmp_path):
    base, ours = _ours("bert-classifier")
    save_adapter(ours, tmp_path)
    _rewrite_config(tmp_path, **changes)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh, tmp_path)
    assert not lora_layers(fresh) and all(p.requires_grad for p in fresh.parameters())  # left as it was


def test_load_names_missing_and_unexpected_keys(tmp_path):
    base, ours = _ours("bert-classifier")
    save_adapter(ours, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(path)
    tensors.pop("base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight")
    tensors["base_model.model.extra.lora_A.weight"] = torch.zeros(1)
    safetensors_torch.save_file(tensors, path)
    fresh = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"missing keys .*layer\.1\.attention\.self\.value\.lora_B.*unexpected keys "
                                         r"extra\.lora_A\.weight"):
        load_adapter(fresh, tmp_path)
    assert not lora_layers(fresh) and not hasattr(fresh, "_lightlm_lora")


def test_io_error_paths(tmp_path):
    base, ours = _ours("bert-classifier")
    with pytest.raises(ValueError, match="missing adapter_model.safetensors, adapter_config.json"):
        load_adapter(copy.deepcopy(base), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="missing adapter_model.safetensors"):
        adapter_nbytes(tmp_path)
    with pytest.raises(TypeError, match="folder must be a str or Path"):
        load_adapter(copy.deepcopy(base), 3)
    with pytest.raises(ValueError, match="no LoRA settings"):
        save_adapter(copy.deepcopy(base), tmp_path)
    with pytest.raises(ValueError, match="task_type must be one of"):
        save_adapter(ours, tmp_path, task_type="CLASSIFY")
    with pytest.raises(TypeError, match="base_model_name_or_path must be a str or None"):
        save_adapter(ours, tmp_path, base_model_name_or_path=3)
    save_adapter(ours, tmp_path)
    with pytest.raises(ValueError, match="already wrapped"):
        load_adapter(ours, tmp_path)
