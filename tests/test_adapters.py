"""lightlm.adapters: the Houlsby adapter against its formula written with torch ops and its closed-form parameter
count, add_adapters on tiny and real BERTs (outputs at init against the unchanged model, counts against
2·L·(2dm + d + m) plus the LayerNorms, what AdamW changes), BitFit and freeze_except against bias and module
counts, and the trainable-parameter line against what PEFT 0.21.2 prints."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import tiny_hf
from lightlm.adapters import (Adapter, AdaptedOutput, add_adapters, bitfit, freeze_except, trainable_parameters,
                              trainable_report, trainable_state_dict)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

D, LAYERS, INTERMEDIATE = 32, 2, 64
IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
TORCH_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh}


def _tiny_bert():
    return tiny_hf("bert")


def _tiny_llama():
    return tiny_hf("llama")


def _logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _adapter_params(d, m, layers):
    return 2 * layers * (2 * d * m + d + m)  # Houlsby: two adapters of 2dm + d + m per layer


def _trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- the adapter


@pytest.mark.parametrize("d, m", [(32, 8), (384, 64), (768, 64), (5, 1)])
def test_adapter_parameter_count_is_the_closed_form(d, m):
    assert sum(p.numel() for p in Adapter(d, m).parameters()) == 2 * d * m + d + m
    assert 2 * (2 * 768 * 64 + 768 + 64) == 198_272  # the per-layer count the module docstring quotes (BERT-base)


@given(activation=st.sampled_from(["gelu", "relu", "tanh"]), d=st.integers(1, 24), m=st.integers(1, 8),
       batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_adapter_forward_is_the_bottleneck_formula(activation, d, m, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    adapter = Adapter(d, m, activation, init_std=0.5)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    adapter = adapter.double()
    h = torch.randn(batch, 3, d, generator=generator, dtype=torch.float64)
    hidden = TORCH_ACTIVATIONS[activation](h @ adapter.down.weight.T + adapter.down.bias)  # σ(W_down h + b_down)
    expected = h + hidden @ adapter.up.weight.T + adapter.up.bias                        # h + W_up (·) + b_up
    torch.testing.assert_close(adapter(h), expected, rtol=1e-12, atol=1e-12)


def test_adapter_is_near_identity_at_init():
    torch.manual_seed(0)
    adapter = Adapter(D, 8)  # std 1e-3
    h = torch.randn(4, 10, D)
    # |σ(z)| ≤ |z| for GELU, biases 0: ‖A(h) − h‖ ≤ ‖W_up‖₂ ‖W_down‖₂ ‖h‖ per token
    bound = torch.linalg.matrix_norm(adapter.up.weight, 2) * torch.linalg.matrix_norm(adapter.down.weight, 2)
    change = (adapter(h) - h).norm(dim=-1)
    assert (change > 0).all() and (change <= bound * h.norm(dim=-1) * (1 + 1e-5)).all()
    assert (change / h.norm(dim=-1)).max() < 1e-4
    for linear in (adapter.down, adapter.up):
        assert not linear.bias.any()


def test_adapter_weights_are_drawn_from_the_callers_generator():
    torch.manual_seed(3)
    first = Adapter(512, 256, init_std=0.02)
    torch.manual_seed(3)
    second = Adapter(512, 256, init_std=0.02)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    std = first.down.weight.std().item()  # 131,072 draws: the sample std is within 1% of 0.02
    assert abs(std - 0.02) < 2e-4 and abs(first.down.weight.mean().item()) < 2e-4


def test_adapter_with_zero_std_is_exactly_the_identity():
    h = torch.randn(3, 5, D)
    for activation in ("gelu", "relu", "tanh"):
        assert torch.equal(Adapter(D, 4, activation, init_std=0)(h), h)


def test_adapted_output_applies_the_adapter_to_the_sublayer():
    torch.manual_seed(0)
    linear = nn.Linear(6, 10, dtype=torch.float64)
    layer = AdaptedOutput(linear, 3, init_std=0.1)
    assert layer.adapter.down.weight.dtype == torch.float64
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.adapter(F.linear(x, linear.weight, linear.bias)), rtol=0, atol=0)


# --------------------------------------------------------------------------- add_adapters


def test_add_adapters_wraps_two_output_projections_per_bert_layer():
    model = _tiny_bert()
    reference = _logits(model)
    found = add_adapters(model, 8, modules_to_save=["classifier"])
    expected = [f"bert.encoder.layer.{i}.{name}" for i in range(LAYERS)
                for name in ("attention.output.dense", "output.dense")]
    assert found["wrapped"] == expected  # "output.dense" also matches attention.output.dense: wrapped once
    assert all(isinstance(model.get_submodule(name), AdaptedOutput) for name in expected)
    assert isinstance(model.bert.encoder.layer[0].intermediate.dense, nn.Linear)
    # near-identity: the logits move by far less than they are
    assert (_logits(model) - reference).abs().max() < 1e-4 * reference.abs().max()


def test_add_adapters_with_zero_std_leaves_the_outputs_exactly_unchanged():
    model = _tiny_bert()
    reference = _logits(model)
    add_adapters(model, 8, init_std=0)
    assert torch.equal(_logits(model), reference)


@pytest.mark.parametrize("train_layernorm", [True, False])
def test_add_adapters_counts_are_the_closed_form(train_layernorm):
    model = _tiny_bert()
    total_before = sum(p.numel() for p in model.parameters())
    found = add_adapters(model, 8, train_layernorm=train_layernorm, modules_to_save=["classifier"])
    layernorms = (2 * LAYERS + 1) * 2 * D if train_layernorm else 0  # two per layer + the embeddings', γ and β
    head = D * 2 + 2                                                    # the classifier, 2 labels
    assert found["trainable"] == _adapter_params(D, 8, LAYERS) + layernorms + head
    assert found["total"] == total_before + _adapter_params(D, 8, LAYERS)
    assert (found["trainable"], found["total"]) == trainable_parameters(model)


def test_only_adapters_layernorms_and_head_change_in_training():
    model = _tiny_bert()
    add_adapters(model, 8, modules_to_save=["classifier"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # every parameter offered; frozen ones get no grad
    labels = torch.tensor([0, 1])
    for _ in range(3):
        optimizer.zero_grad()
        model(IDS, labels=labels).loss.backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    expected = {name for name in before if ".adapter." in name or "LayerNorm" in name or name.startswith("classifier")}
    assert changed == expected == _trainable_names(model)


def test_add_adapters_on_llama_targets_o_proj_and_trains_rmsnorm():
    model = _tiny_llama()
    with pytest.raises(ValueError, match="o_proj"):  # the BERT default matches nothing: the Linears are listed
        add_adapters(model, 4)
    found = add_adapters(model, 4, target_modules=["o_proj", "down_proj"])
    assert len(found["wrapped"]) == 4
    norms = (2 * 2 + 1) * 32  # input and post-attention RMSNorm per layer, and the final one (γ only)
    assert found["trainable"] == _adapter_params(32, 4, 2) + norms


def test_add_adapters_on_minilm(minilm):
    _, base = minilm
    model = copy.deepcopy(base)  # the session fixture stays untouched
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    reference = _logits(model, ids)
    found = add_adapters(model, 64)
    assert len(found["wrapped"]) == 12  # two per layer, six layers
    assert found["trainable"] == _adapter_params(384, 64, 6) + 13 * 2 * 384 == 605_184
    assert found["total"] == sum(p.numel() for p in base.parameters()) + _adapter_params(384, 64, 6)
    assert (_logits(model, ids) - reference).abs().max() < 1e-3 * reference.abs().max()
    exact = copy.deepcopy(base)
    add_adapters(exact, 64, init_std=0)
    assert torch.equal(_logits(exact, ids), reference)


# --------------------------------------------------------------------------- BitFit and freeze_except


def test_bitfit_trains_exactly_the_biases():
    model = _tiny_bert()
    biases = sum(p.numel() for name, p in model.named_parameters() if name.split(".")[-1] == "bias")
    found = bitfit(model)
    assert found["trainable"] == biases and len(found["biases"]) == 8 * LAYERS + 3  # incl. LayerNorm β, pooler
    head = bitfit(_tiny_bert(), modules_to_save=["classifier"])
    assert head["trainable"] == biases + D * 2  # the classifier's weight too


def test_bitfit_refuses_a_model_without_biases():
    with pytest.raises(ValueError, match="no bias parameters.*LoRA"):
        bitfit(_tiny_llama())


def test_freeze_except_is_linear_probing():
    model = _tiny_bert()
    found = freeze_except(model, ["classifier"])
    assert found["matched"] == ["classifier"] and found["trainable"] == D * 2 + 2
    assert _trainable_names(model) == {"classifier.weight", "classifier.bias"}
    found = freeze_except(model, ["word_embeddings.weight", "bert.pooler.dense.bias"])  # parameter names
    assert _trainable_names(model) == {"bert.embeddings.word_embeddings.weight", "bert.pooler.dense.bias"}
    assert found["trainable"] == 100 * D + D


def test_peft_counts_agree_with_ours():
    from peft import PeftModel

    model = _tiny_bert()
    bitfit(model, modules_to_save=["classifier"])
    assert PeftModel.get_nb_trainable_parameters(model) == trainable_parameters(model)  # PEFT's count, unbound


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # PEFT calls it
def test_trainable_report_is_peft_print_trainable_parameters(capsys):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"],
                                                         modules_to_save=["classifier"]))
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert printed == trainable_report(peft_model) + "\n"
    assert printed.startswith("trainable params: ") and "," in printed  # thousands separators at 40k parameters


def test_trainable_state_dict_holds_the_method_and_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_bert()
    add_adapters(model, 8, modules_to_save=["classifier"], init_std=0.1)
    state = trainable_state_dict(model)
    assert set(state) == _trainable_names(model)
    path = tmp_path / "adapter.safetensors"
    save_file(state, path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert tensor_bytes == 4 * trainable_parameters(model)[0]
    assert tensor_bytes < path.stat().st_size < tensor_bytes + 8192  # plus a JSON header
    fresh = _tiny_bert()
    torch.manual_seed(5)
    add_adapters(fresh, 8, modules_to_save=["classifier"], init_std=0.1)  # different adapter draws
    assert not torch.equal(_logits(fresh), _logits(model))
    missing, unexpected = fresh.load_state_dict(load_file(path), strict=False)
    assert not unexpected and set(missing).isdisjoint(state)
    assert torch.equal(_logits(fresh), _logits(model))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, error, match", [
    (lambda: Adapter(0, 4), ValueError, "features"),
    (lambda: Adapter(8, 4, "swish"), ValueError, "activation must be one of"),
    (lambda: Adapter(8, 4, init_std=-1.0), ValueError, "init_std"),
    (lambda: Adapter(8, 0), ValueError, "bottleneck"),
    (lambda: Adapter(8, 4)(torch.zeros(2, 7)), ValueError, "features=8"),
    (lambda: AdaptedOutput(nn.ReLU(), 4), TypeError, "out_features"),
    (lambda: AdaptedOutput(AdaptedOutput(nn.Linear(4, 4), 2), 2), ValueError, "already"),
    (lambda: AdaptedOutput("dense", 2), TypeError, "base_layer"),
    (lambda: add_adapters(_tiny_bert(), 8, target_modules=["nothing"]), ValueError, "Linears are: .*query"),
    (lambda: add_adapters(_tiny_bert(), 8, target_modules=["output"]), ValueError, "not a Linear"),
    (lambda: add_adapters(_tiny_bert(), 8, target_modules=[]), ValueError, "at least one"),
    (lambda: add_adapters(_tiny_bert(), 8, target_modules=[3]), TypeError, "target_modules entries"),
    (lambda: add_adapters(_tiny_bert(), 0), ValueError, "bottleneck"),
    (lambda: add_adapters(_tiny_bert(), 8, train_layernorm=1), TypeError, "train_layernorm"),
    (lambda: add_adapters(_tiny_bert(), 8, activation="elu"), ValueError, "activation"),
    (lambda: add_adapters(_tiny_bert(), 8, modules_to_save=["head"]), ValueError, "modules_to_save entry 'head'"),
    (lambda: add_adapters("model", 8), TypeError, "model"),
    (lambda: bitfit(_tiny_bert(), modules_to_save=["head"]), ValueError, "modules_to_save"),
    (lambda: bitfit(nn.Linear(2, 2), modules_to_save=5), TypeError, "modules_to_save"),
    (lambda: freeze_except(_tiny_bert(), ["head"]), ValueError, r"encoder\.layer\.N\.attention"),
    (lambda: freeze_except(_tiny_bert(), 3), TypeError, "names"),
    (lambda: trainable_report(nn.ReLU()), ValueError, "no parameters"),
    (lambda: trainable_parameters([1]), TypeError, "model"),
    (lambda: trainable_state_dict(None), TypeError, "model"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_second_add_adapters_is_refused_before_anything_changes():
    model = _tiny_bert()
    add_adapters(model, 8)
    state = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="already has an adapter"):
        add_adapters(model, 8, train_layernorm=False)
    assert state == {name: p.requires_grad for name, p in model.named_parameters()}
    fresh = _tiny_bert()
    with pytest.raises(ValueError, match="modules_to_save"):  # a bad name is found before anything is wrapped
        add_adapters(fresh, 8, modules_to_save=["head"])
    assert not any(isinstance(m, AdaptedOutput) for m in fresh.modules())
    assert all(p.requires_grad for p in fresh.parameters())
