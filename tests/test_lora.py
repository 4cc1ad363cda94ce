"""lightlm.lora against PEFT 0.21.2 (get_peft_model with the same A and B copied in: outputs, trainable counts,
targeted modules, merged weights, the initial A drawn from the same seed), against the closed form
h = W₀x + s·BAx in float64 (a hypothesis property), and against the base model itself (exact start, merge/unmerge,
only LoRA and the saved head move under AdamW)."""

import copy
import math

import pytest
import torch
from conftest import tiny_hf
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightlm import cost
from lightlm.lora import (LoRALinear, add_lora, lora_layers, lora_param_count, lora_settings, matching_names,
                          merge_lora, remove_lora, unmerge_lora)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny(kind: str) -> nn.Module:
    return tiny_hf(kind)


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize(model: nn.Module, seed: int = 5) -> None:
    """Nonzero A and B (B = 0 would make every comparison trivial), and a perturbed saved head."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=generator) * 0.3)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.3)
        for name in lora_settings(model)["saved_modules"]:
            for parameter in model.get_submodule(name).parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


def _copy_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """Our A, B and saved modules into PEFT's ``lora_A.default``/``modules_to_save.default``."""
    theirs = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            for matrix in ("lora_A", "lora_B"):
                theirs[f"base_model.model.{name}.{matrix}.default.weight"].copy_(getattr(layer, matrix).weight)
        for name in lora_settings(ours)["saved_modules"]:
            for key, parameter in ours.get_submodule(name).named_parameters():
                theirs[f"base_model.model.{name}.modules_to_save.default.{key}"].copy_(parameter)


# (model, target_modules, modules_to_save, closed-form LoRA parameter count at r = 4)
CASES = {
    "bert-query-value-classifier": ("bert", ["query", "value"], ["classifier"], lora_param_count(32, 32, 4, 4)),
    "llama-q-v": ("llama", ["q_proj", "v_proj"], None, lora_param_count(32, 32, 4, 2) + lora_param_count(32, 16, 4, 2)),
    "llama-regex": ("llama", r".*\.(q|v)_proj", None, lora_param_count(32, 32, 4, 2) + lora_param_count(32, 16, 4, 2)),
    "gpt2-c_attn-conv1d": ("gpt2", ["c_attn"], None, lora_param_count(32, 96, 4, 2)),
}


def _pair(case: str, rslora: bool = False, r: int = 4, alpha: float = 8):
    kind, targets, saves, _ = CASES[case]
    base = _tiny(kind)
    ours = copy.deepcopy(base)
    report = add_lora(ours, targets, r=r, alpha=alpha, rslora=rslora, modules_to_save=saves)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                             modules_to_save=saves and list(saves), fan_in_fan_out=kind == "gpt2")
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    return base, ours, theirs, report


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_counts_equal_peft(case, rslora):
    base, ours, theirs, report = _pair(case, rslora=rslora)
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    torch.testing.assert_close(_logits(ours, _inputs()), _logits(theirs, _inputs()))
    assert (report["trainable"], report["total"]) == theirs.get_nb_trainable_parameters()
    saved = sum(p.numel() for name in lora_settings(ours)["saved_modules"]
                for p in ours.get_submodule(name).parameters())
    assert report["trainable"] - saved == CASES[case][3]
    assert report["wrapped"] == theirs.base_model.targeted_module_names
    assert not torch.allclose(_logits(ours, _inputs()), _logits(base, _inputs()))  # the update is not trivial


def test_rslora_scaling_is_alpha_over_root_r():
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=8, rslora=True)
    assert layer.scaling == 8 / math.sqrt(4) and LoRALinear(nn.Linear(16, 16), r=4, alpha=8).scaling == 2


def test_dropout_in_training_equals_peft_with_the_same_seed():
    base = _tiny("llama")
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    add_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.3)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.3))
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    ours.train(), theirs.train()
    torch.manual_seed(7)
    ours_out = ours(input_ids=_inputs()).logits
    torch.manual_seed(7)
    torch.testing.assert_close(ours_out, theirs(input_ids=_inputs()).logits)
    ours.eval()
    assert not torch.allclose(ours_out, _logits(ours, _inputs()))  # dropout did act


def test_bfloat16_base_gets_float32_adapters_like_peft():
    base = _tiny("llama").to(torch.bfloat16)
    ours = copy.deepcopy(base)
    add_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                      target_modules=["q_proj", "v_proj"]))
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    layer = next(iter(lora_layers(ours).values()))
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    ours_out = _logits(ours, _inputs())
    assert ours_out.dtype == torch.bfloat16
    torch.testing.assert_close(ours_out, _logits(theirs, _inputs()))


def test_initialisation_is_exactly_the_base_model_and_pefts_a():
    base = _tiny("llama")
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(3)
    add_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert torch.equal(_logits(ours, _inputs()), _logits(base, _inputs()))  # B = 0: exactly the base
    their_params = dict(theirs.named_parameters())
    for name, layer in lora_layers(ours).items():
        bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=√5): U(-1/√d_in, 1/√d_in)
        assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.5 * bound
        assert torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))
        assert torch.equal(layer.lora_A.weight, their_params[f"base_model.model.{name}.lora_A.default.weight"])


@pytest.mark.parametrize("case", ["bert-query-value-classifier", "gpt2-c_attn-conv1d"])
def test_merge_unmerge_and_remove_match_peft_merge_and_unload(case):
    base, ours, theirs, _ = _pair(case)
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    before = {name: layer.base.weight.detach().clone() for name, layer in lora_layers(ours).items()}
    unmerged = _logits(ours, _inputs())
    merge_lora(ours)
    assert all(layer.merged for layer in lora_layers(ours).values())
    torch.testing.assert_close(_logits(ours, _inputs()), unmerged)
    unmerge_lora(ours)
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.base.weight, before[name])  # exact up to float rounding
    remove_lora(ours)
    assert not lora_layers(ours) and not hasattr(ours, "_lightlm_lora")
    merged_theirs = theirs.merge_and_unload()
    assert type(ours.get_submodule(next(iter(before)))) is type(base.get_submodule(next(iter(before))))
    torch.testing.assert_close(ours.state_dict(), merged_theirs.state_dict())
    torch.testing.assert_close(_logits(ours, _inputs()), unmerged)


def test_remove_without_merge_gives_the_base_back():
    base, ours, _, _ = _pair("gpt2-c_attn-conv1d")
    _randomize(ours)
    merge_lora(ours)
    remove_lora(ours, merge=False)
    torch.testing.assert_close(ours.state_dict(), base.state_dict())
    torch.testing.assert_close(_logits(ours, _inputs()), _logits(base, _inputs()))


def test_adamw_steps_move_only_lora_and_the_saved_head():
    base = _tiny("bert")
    ours = copy.deepcopy(base)
    add_lora(ours, ["query", "value"], r=4, alpha=8, modules_to_save=["classifier"])
    before = {key: value.clone() for key, value in ours.state_dict().items()}
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-2)  # every parameter offered: freezing must hold
    ours.train()
    for step in range(3):
        loss = nn.functional.cross_entropy(ours(input_ids=_inputs(step)).logits, torch.tensor([0, 1]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {key for key, value in ours.state_dict().items() if not torch.equal(value, before[key])}
    lora_keys = {f"{name}.{m}.weight" for name in lora_layers(ours) for m in ("lora_A", "lora_B")}
    assert changed == lora_keys | {"classifier.weight", "classifier.bias"}
    for name in lora_layers(ours):  # the frozen W₀ and bias, bit for bit
        assert torch.equal(ours.get_submodule(name).base.weight, base.get_submodule(name).weight)


class _RoundedLinear(nn.Module):
    """A stand-in quantized linear: the weight lives on a grid of step 1/8 (set_weight rounds to it)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("codes", torch.round(weight * 8))

    def dequantized_weight(self) -> torch.Tensor:
        return self.codes / 8

    def set_weight(self, weight: torch.Tensor) -> None:
        self.codes.copy_(torch.round(weight * 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantized_weight().T


def test_a_quantized_base_merges_through_set_weight_and_cannot_unmerge():
    generator = torch.Generator().manual_seed(0)
    quantized = _RoundedLinear(torch.randn(6, 5, generator=generator))
    model = nn.Sequential(quantized)
    add_lora(model, ["0"], r=2, alpha=4)
    layer = model[0]
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, generator=generator)
    w_q = quantized.dequantized_weight().clone()
    delta = 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # s = α/r = 2
    torch.testing.assert_close(layer(x), x @ (w_q + delta).T)
    layer.merge()
    assert torch.equal(quantized.dequantized_weight(), torch.round((w_q + delta) * 8) / 8)  # re-quantized
    with pytest.raises(ValueError, match="rounded"):
        layer.unmerge()


def test_nf4_linear_is_a_lora_base():
    qlora = pytest.importorskip("lightlm.qlora")
    from lightlm.quant_formats import nf4_dequantize, nf4_quantize

    torch.manual_seed(0)
    nf4 = qlora.NF4Linear.from_linear(nn.Linear(64, 32))
    model = nn.Sequential(nf4)
    assert add_lora(model, ["0"], r=4, alpha=8)["wrapped"] == ["0"]  # found by its attributes
    layer = model[0]
    nn.init.normal_(layer.lora_B.weight, std=0.01)
    x = torch.randn(3, 64)
    w_q = nf4.dequantized_weight().clone()
    delta = 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # s = α/r = 2
    torch.testing.assert_close(layer(x), nf4(x) + x @ delta.T)
    layer.merge()  # re-quantizes W_q + ΔW: the NF4 round trip of that sum
    assert torch.equal(nf4.dequantized_weight(), nf4_dequantize(nf4_quantize(w_q + delta, 64, True)))
    assert not torch.equal(nf4.dequantized_weight(), w_q + delta)  # it rounded
    with pytest.raises(ValueError, match="rounded"):
        layer.unmerge()


def test_modules_to_save_are_never_wrapped_as_in_peft():
    base = _tiny("bert")
    ours = copy.deepcopy(base)
    report = add_lora(ours, ["query", "classifier"], r=4, alpha=8, modules_to_save=["classifier"])
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "classifier"], modules_to_save=["classifier"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    assert report["wrapped"] == theirs.base_model.targeted_module_names == matching_names(ours, ["query"])
    assert (report["trainable"], report["total"]) == theirs.get_nb_trainable_parameters()


def test_a_base_without_a_float_weight_or_set_weight_cannot_merge():
    class Features(nn.Module):
        in_features, out_features = 4, 4

        def forward(self, x):
            return x

    layer = LoRALinear(Features(), r=2, alpha=2)
    torch.testing.assert_close(layer(torch.ones(1, 4)), torch.ones(1, 4))  # B = 0
    with pytest.raises(TypeError, match="cannot merge into a Features"):
        layer.merge()


@given(d_in=st.integers(1, 10), d_out=st.integers(1, 10), r=st.integers(1, 10),
       alpha=st.floats(0.1, 64), rslora=st.booleans(), conv1d=st.booleans(), seed=st.integers(0, 2**16))
def test_update_is_the_closed_form_and_merge_keeps_the_output(d_in, d_out, r, alpha, rslora, conv1d, seed):
    r = min(r, d_in, d_out)
    generator = torch.Generator().manual_seed(seed)
    if conv1d:
        base = transformers.pytorch_utils.Conv1D(d_out, d_in).double()
    else:
        base = nn.Linear(d_in, d_out, dtype=torch.float64)
    layer = LoRALinear(base, r=r, alpha=alpha, rslora=rslora)
    a = torch.randn(r, d_in, generator=generator, dtype=torch.float64)
    b = torch.randn(d_out, r, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_A.weight.copy_(a), layer.lora_B.weight.copy_(b)
    x = torch.randn(4, d_in, generator=generator, dtype=torch.float64)
    s = alpha / (math.sqrt(r) if rslora else r)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - base(x), x @ (s * b @ a).T)
        original, unmerged = base.weight.clone(), layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged)
        layer.unmerge()
        torch.testing.assert_close(base.weight, original)


def test_matching_follows_peft_rules():
    model = _tiny("bert")
    assert matching_names(model, ["query"]) == [f"bert.encoder.layer.{i}.attention.self.query" for i in (0, 1)]
    assert matching_names(model, ["dense"])[0] == "bert.encoder.layer.0.attention.output.dense"
    assert matching_names(model, ["uery"]) == []  # a dotted suffix, not a substring
    assert matching_names(model, r"bert\.encoder\.layer\.1\..*\.query") == ["bert.encoder.layer.1.attention.self.query"]
    assert matching_names(model, "query") == []  # a string must match the whole name


def test_lora_param_count_moved_here_and_cost_keeps_it():
    assert cost.lora_param_count is lora_param_count
    assert lora_param_count(384, 384, 8, n_matrices=12) == 73_728


def _linear() -> nn.Linear:
    return nn.Linear(8, 6)


@pytest.mark.parametrize("call, error, message", [
    (lambda: LoRALinear(_linear(), r=0, alpha=1), ValueError, "r must be >= 1, got 0"),
    (lambda: LoRALinear(_linear(), r=7, alpha=1), ValueError, r"r must be <= min\(in_features, out_features\) = 6"),
    (lambda: LoRALinear(_linear(), r=2.0, alpha=1), TypeError, "r must be an int, got float"),
    (lambda: LoRALinear(_linear(), r=2, alpha=0), ValueError, "alpha must be > 0"),
    (lambda: LoRALinear(_linear(), r=2, alpha="8"), TypeError, "alpha must be a real number"),
    (lambda: LoRALinear(_linear(), r=2, alpha=1, dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
    (lambda: LoRALinear(_linear(), r=2, alpha=1, dropout=-0.1), ValueError, r"dropout must be in \[0, 1\)"),
    (lambda: LoRALinear(_linear(), r=2, alpha=1, rslora=1), TypeError, "rslora must be True or False"),
    (lambda: LoRALinear(nn.Conv2d(3, 3, 1), r=1, alpha=1), TypeError, "base must be an nn.Linear, a transformers"),
    (lambda: LoRALinear("linear", r=1, alpha=1), TypeError, "base must be a torch.nn.Module"),
    (lambda: LoRALinear(LoRALinear(_linear(), 2, 1), r=1, alpha=1), ValueError, "already wrapped"),
    (lambda: add_lora(_tiny("bert"), ["attn"]), ValueError, "leaf names are: query, key, value, dense, classifier"),
    (lambda: add_lora(_tiny("bert"), "query"), ValueError, "match no Linear"),
    (lambda: add_lora(_tiny("bert"), 3), TypeError, "target_modules must be a regex string or a list"),
    (lambda: add_lora(_tiny("bert"), []), ValueError, "target_modules must name at least one module"),
    (lambda: add_lora(_tiny("bert"), ["query"], modules_to_save=["head"]), ValueError, r"\['head'\] match no"),
    (lambda: add_lora(_tiny("bert"), ["query"], r=40), ValueError, "r must be <="),
    (lambda: merge_lora(_tiny("bert")), ValueError, "no LoRA layers"),
    (lambda: unmerge_lora(_tiny("bert")), ValueError, "no LoRA layers"),
    (lambda: remove_lora(_tiny("bert")), ValueError, "no LoRA layers"),
    (lambda: lora_settings(_tiny("bert")), ValueError, "no LoRA settings"),
    (lambda: lora_layers("model"), TypeError, "model must be a torch.nn.Module"),
])
def test_rejects_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_rejects_double_wrap_double_merge_and_unmerging_unmerged():
    model = _tiny("bert")
    add_lora(model, ["query"])
    with pytest.raises(ValueError, match="already wrapped"):
        add_lora(model, ["value"])
    layer = next(iter(lora_layers(model).values()))
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
    with pytest.raises(TypeError, match="merge must be True or False"):
        remove_lora(model, merge="yes")


def test_a_failed_add_lora_leaves_the_model_unchanged():
    model = _tiny("llama")  # q_proj 32 -> 32, v_proj 32 -> 16: r = 20 fits q but not v
    with pytest.raises(ValueError, match="r must be <= min"):
        add_lora(model, ["q_proj", "v_proj"], r=20)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_minilm_lora_equals_peft(minilm):
    _, model = minilm
    ours = copy.deepcopy(model)
    report = add_lora(ours, ["query", "value"], r=8, alpha=16)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=8, lora_alpha=16,
                                                                       target_modules=["query", "value"]))
    _randomize(ours)
    _copy_into_peft(ours, theirs)
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state)
    assert (report["trainable"], report["total"]) == theirs.get_nb_trainable_parameters()
    assert report["trainable"] == lora_param_count(384, 384, 8, n_matrices=12) == 73_728
