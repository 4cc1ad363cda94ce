"""lightlm.qlora: NF4Linear against lightlm.quant_formats' NF4 round trip and, independently, torchao's ``to_nf4``
(within the bound tests/test_quant_formats.py establishes), its forward against F.linear and autograd, its bytes
against the closed form of QLoRA's bits per weight, quantize_nf4 on a tiny Llama against the same model with
round-tripped weights, and merge_rounding against the direct float64 computation."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightlm.adapters import trainable_parameters
from lightlm.qlora import NF4Linear, merge_rounding, quantize_nf4
from lightlm.quant_formats import NF4_CODE, nf4_bits_per_weight, nf4_dequantize, nf4_quantize

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

EPS = torch.finfo(torch.float32).eps


def _linear(in_features=128, out_features=64, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _round_trip(weight, double_quant=True):
    return nf4_dequantize(nf4_quantize(weight, 64, double_quant))


def _unpack(codes):
    return torch.stack([codes >> 4, codes & 0xF], dim=-1).flatten().long()


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


# --------------------------------------------------------------------------- NF4Linear


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_linear_weight_is_the_nf4_round_trip(double_quant):
    linear = _linear()
    layer = NF4Linear.from_linear(linear, double_quant=double_quant)
    assert torch.equal(layer.dequantized_weight(), _round_trip(linear.weight.detach(), double_quant))
    assert torch.equal(layer.bias, linear.bias) and not layer.bias.requires_grad
    assert layer.codes.dtype == torch.uint8 and layer.codes.numel() == 128 * 64 // 2
    assert not list(p for p in layer.parameters() if p.requires_grad)


def test_nf4_linear_weight_is_torchaos_to_nf4():
    from torchao.quantization import to_nf4

    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    layer = NF4Linear.from_linear(nn.Linear(128, 256, bias=False))
    layer.set_weight(weight)
    theirs = to_nf4(weight, 64, 256)
    # the same int8 double-quantized scales; indices may differ only near a midpoint of torchao's rounded table
    assert torch.equal(layer.absmax_q, theirs.quantized_scalers)
    ours, their_codes = _unpack(layer.codes), _unpack(theirs.quantized_data)
    differ = ours != their_codes
    assert differ.sum() < 1e-3 * weight.numel()
    # where they agree: |x̂ − x̂'| ≤ |NF4 − NF4'|[i] · a' + eps · a' (test_quant_formats.py's bound)
    scales = theirs.dequantize_scalers(theirs.quantized_scalers, theirs.quantization_factor, 256)
    scales = scales.repeat_interleave(64)
    bound = (NF4_CODE - theirs.nf4).abs()[ours] * scales + EPS * scales
    difference = (layer.dequantized_weight().flatten() - theirs.get_original_weight().flatten()).abs()
    assert (difference[~differ] <= bound[~differ]).all()


@given(in_blocks=st.integers(1, 4), out_features=st.integers(1, 6), batch=st.integers(1, 3),
       bias=st.booleans(), double_quant=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_nf4_linear_forward_is_f_linear_with_the_dequantized_weight(in_blocks, out_features, batch, bias,
                                                                     double_quant, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, 64 * in_blocks, generator=generator)
    linear = nn.Linear(64 * in_blocks, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = NF4Linear.from_linear(linear, double_quant=double_quant)
    x = torch.randn(batch, 2, 64 * in_blocks, generator=generator, dtype=dtype)
    expected = F.linear(x, _round_trip(weight, double_quant).to(dtype), None if not bias else linear.bias.to(dtype))
    out = layer(x)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_gradients_flow_through_the_frozen_nf4_weight_to_the_input():
    layer = NF4Linear.from_linear(_linear())
    x = torch.randn(3, 128, requires_grad=True)
    upstream = torch.randn(3, 64)
    (layer(x) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream @ layer.dequantized_weight())  # ∂L/∂x = g Ŵ
    assert layer.bias.grad is None


@pytest.mark.parametrize("shape, bias", [((256, 64), True), ((128, 256), False), ((64, 1024), True)])
def test_nf4_linear_bytes_are_qloras_bits_per_weight(shape, bias):
    out_features, in_features = shape
    layer = NF4Linear.from_linear(_linear(in_features, out_features, bias))
    numel, bias_bytes = out_features * in_features, 4 * out_features if bias else 0
    # 4 + 8/64 + 32/(64·256) bits per weight (blocks a multiple of 256 here), plus the float32 mean ā
    assert layer.nbytes() == nf4_bits_per_weight(64, True) * numel / 8 + 4 + bias_bytes
    plain = NF4Linear.from_linear(_linear(in_features, out_features, bias), double_quant=False)
    assert plain.nbytes() == 4.5 * numel / 8 + bias_bytes
    stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert stored == layer.nbytes()  # the state dict holds exactly what nbytes counts


@pytest.mark.parametrize("double_quant", [True, False])
def test_set_weight_requantizes_in_place(double_quant):
    layer = NF4Linear.from_linear(_linear(), double_quant=double_quant)
    buffers = {name: buffer.data_ptr() for name, buffer in layer.named_buffers()}
    new = torch.randn(64, 128, dtype=torch.float64) * 0.1
    layer.set_weight(new)
    assert torch.equal(layer.dequantized_weight(), _round_trip(new.float(), double_quant))
    assert buffers == {name: buffer.data_ptr() for name, buffer in layer.named_buffers()}  # the same storage
    if not double_quant:  # a weight already on the grid is stored again unchanged: a = max|a·NF4[i]|, x/a → i
        stored = layer.dequantized_weight()
        layer.set_weight(stored)
        assert torch.equal(layer.dequantized_weight(), stored)


def test_nf4_linear_state_dict_round_trips():
    layer = NF4Linear.from_linear(_linear())
    fresh = NF4Linear(128, 64)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantized_weight(), layer.dequantized_weight())
    assert "block_size=64, double_quant=True" in repr(fresh)


# --------------------------------------------------------------------------- quantize_nf4


def test_quantize_nf4_on_a_tiny_llama_skips_lm_head():
    model = _tiny_llama()
    total_before = trainable_parameters(model)[1]
    reference = copy.deepcopy(model)
    linears = {name: m for name, m in reference.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        for name, linear in linears.items():
            if name != "lm_head":
                linear.weight.copy_(_round_trip(linear.weight))  # the float model with NF4-rounded weights
    found = quantize_nf4(model)
    assert found["quantized"] == [name for name in linears if name != "lm_head"] and len(found["quantized"]) == 14
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)
    weights = sum(linears[name].weight.numel() for name in found["quantized"])
    assert found["bytes_before"] == 4 * weights  # float32, no biases in Llama
    assert found["bytes_after"] == sum(model.get_submodule(n).nbytes() for n in found["quantized"])
    assert found["bytes_after"] < found["bytes_before"] / 7
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-6)
    assert trainable_parameters(model)[1] == total_before  # an NF4 weight still counts in·out, as in PEFT


def test_quantize_nf4_checks_every_layer_before_replacing_any():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 3))  # 192 weights: 3 blocks; then one of 7
    model.append(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"^2 has 9 weights"):
        quantize_nf4(model, skip=("lm_head",))
    assert all(isinstance(m, nn.Linear) for m in model)
    found = quantize_nf4(model, skip=("2", "nothing"))  # a skip entry that matches nothing is fine
    assert found["quantized"] == ["0", "1"] and isinstance(model[2], nn.Linear)


def test_quantize_nf4_on_minilm(minilm):
    _, base = minilm
    model = copy.deepcopy(base)  # the session fixture stays untouched
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(_round_trip(module.weight))
    found = quantize_nf4(model)
    assert len(found["quantized"]) == 6 * 6 + 1  # q, k, v, attention output, intermediate, output; the pooler
    weights = sum(m.weight.numel() for m in base.modules() if isinstance(m, nn.Linear))
    biases = sum(m.bias.numel() for m in base.modules() if isinstance(m, nn.Linear))
    blocks = weights // 64
    factors = sum(-(-model.get_submodule(n).absmax_q.numel() // 256) for n in found["quantized"])
    assert found["bytes_after"] == weights // 2 + blocks + 4 * factors + 4 * len(found["quantized"]) + 4 * biases
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, reference(ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- merge_rounding


def test_merge_rounding_is_the_direct_computation_and_changes_nothing():
    layer = NF4Linear.from_linear(_linear())
    state = {name: t.clone() for name, t in layer.state_dict().items()}
    delta = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * 1e-3
    found = merge_rounding(layer, delta)
    merged = _round_trip(_linear().weight.detach()) + delta                   # Ŵ + ΔW
    error = _round_trip(merged).double() - merged.double()                      # Q(Ŵ + ΔW) − (Ŵ + ΔW)
    assert found["relative_error"] == pytest.approx((error.norm() / delta.double().norm()).item(), rel=1e-12)
    assert found["max_abs"] == pytest.approx(error.abs().max().item(), rel=1e-12)
    assert found["relative_error"] > 0
    assert all(torch.equal(t, state[name]) for name, t in layer.state_dict().items())


def test_an_update_far_below_the_level_gaps_is_rounded_away():
    # Ŵ sits on the levels; an update of 1e-5 (level gaps are ~0.003 here) that leaves every block's absmax
    # alone moves no weight past a midpoint: Q(Ŵ + ΔW) = Ŵ, the merge loses all of ΔW (relative error 1)
    layer = NF4Linear.from_linear(_linear(), double_quant=False)
    stored = layer.dequantized_weight().reshape(-1, 64)
    at_absmax = stored.abs() == stored.abs().amax(dim=1, keepdim=True)  # the weights on level ±1
    delta = torch.where(at_absmax, 0.0, 1e-5).reshape(64, 128)
    assert torch.equal(_round_trip(stored.reshape(64, 128) + delta, False), stored.reshape(64, 128))
    found = merge_rounding(layer, delta)
    assert found["relative_error"] == pytest.approx(1.0, abs=1e-3)  # float32 rounding of Ŵ + ΔW: < 1e-3
    # an update that moves the absmax rescales its whole block: not just rounded away, but distorted (> 1)
    assert merge_rounding(layer, torch.full((64, 128), 1e-5))["relative_error"] > 1.05


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_small_random_update_costs_more_than_it_is_worth(double_quant):
    # every block's absmax moves to the largest perturbed ±a entry, so Q(W') is Ŵ rescaled, not Ŵ + ΔW
    layer = NF4Linear.from_linear(_linear(), double_quant=double_quant)
    noise = torch.randn(64, 128, generator=torch.Generator().manual_seed(3))
    small = merge_rounding(layer, noise * 1e-3)["relative_error"]     # std 1e-3, level gaps ~3e-3
    large = merge_rounding(layer, noise * 1e-2)["relative_error"]     # an update larger than the gaps
    assert small > 1.2 and large < 0.6


# --------------------------------------------------------------------------- a LoRA base


def test_nf4_linear_is_a_lora_base():
    lora = pytest.importorskip("lightlm.lora")
    layer = NF4Linear.from_linear(_linear())
    wrapped = lora.LoRALinear(layer, r=4, alpha=8)
    with torch.no_grad():
        wrapped.lora_B.weight.normal_(0, 0.01)
    delta = wrapped.delta_weight().detach()
    x = torch.randn(2, 128)
    torch.testing.assert_close(wrapped(x), F.linear(x, layer.dequantized_weight() + delta, layer.bias))
    expected = merge_rounding(layer, delta)
    target = layer.dequantized_weight() + delta
    wrapped.merge()  # re-quantizes Ŵ + ΔW: exactly what merge_rounding measured
    error = (layer.dequantized_weight().double() - target.double())
    assert (error.norm() / delta.double().norm()).item() == pytest.approx(expected["relative_error"], rel=1e-6)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, error, match", [
    (lambda: NF4Linear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "nn.Linear"),
    (lambda: NF4Linear.from_linear(_linear(10, 3)), ValueError, "block may not be cut"),
    (lambda: NF4Linear.from_linear(_linear(), block_size=63), ValueError, "even"),
    (lambda: NF4Linear.from_linear(_linear(), block_size=1), ValueError, "block_size"),
    (lambda: NF4Linear.from_linear(_linear(), double_quant=1), TypeError, "double_quant"),
    (lambda: NF4Linear(0, 64), ValueError, "in_features"),
    (lambda: NF4Linear.from_linear(_linear())(torch.zeros(2, 127)), ValueError, "in_features=128"),
    (lambda: NF4Linear.from_linear(_linear())(torch.zeros(2, 128, dtype=torch.long)), TypeError, "floating"),
    (lambda: NF4Linear.from_linear(_linear()).set_weight(torch.zeros(128, 64)), ValueError, r"\(64, 128\)"),
    (lambda: NF4Linear.from_linear(_linear()).set_weight(torch.full((64, 128), float("nan"))), ValueError,
     "finite"),
    (lambda: NF4Linear.from_linear(_linear()).set_weight([[0.0]]), TypeError, "weight"),
    (lambda: quantize_nf4(_linear()), TypeError, "NF4Linear.from_linear"),
    (lambda: quantize_nf4(nn.Sequential(nn.ReLU())), ValueError, "no nn.Linear"),
    (lambda: quantize_nf4(nn.Sequential(_linear()), skip=[1]), TypeError, "skip entries"),
    (lambda: quantize_nf4(nn.Sequential(_linear()), skip=None), TypeError, "skip"),
    (lambda: quantize_nf4(nn.Sequential(_linear()), block_size=3), ValueError, "even"),
    (lambda: quantize_nf4(nn.Sequential(_linear()), double_quant="yes"), TypeError, "double_quant"),
    (lambda: merge_rounding(_linear(), torch.zeros(64, 128)), TypeError, "NF4Linear"),
    (lambda: merge_rounding(NF4Linear.from_linear(_linear()), torch.zeros(64, 128)), ValueError, "all zeros"),
    (lambda: merge_rounding(NF4Linear.from_linear(_linear()), torch.ones(128, 64)), ValueError, "shape"),
    (lambda: merge_rounding(NF4Linear.from_linear(_linear()), torch.full((64, 128), float("inf"))), ValueError,
     "finite"),
    (lambda: merge_rounding(NF4Linear.from_linear(_linear()), torch.ones(64, 128, dtype=torch.int32)), TypeError,
     "floating"),
])
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_nan_weight_is_refused_before_any_layer_is_replaced():
    model = nn.Sequential(_linear(), _linear(64, 64))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight of 1 has NaN"):
        quantize_nf4(model)
    assert isinstance(model[0], nn.Linear)


def test_add_lora_over_nf4_counts_the_packed_weights_as_peft_counts_4_bit_ones():
    """add_lora's total, like adapters.trainable_parameters, counts an NF4 base at its unpacked in·out size, so
    quantizing the base leaves 'all params' unchanged (PEFT does the same for bitsandbytes' Linear4bit)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightlm import adapters, lora, qlora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    dense_total = sum(p.numel() for p in model.parameters())
    qlora.quantize_nf4(model)
    report = lora.add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert report["trainable"] == lora.lora_param_count(64, 64, 4, 2) + lora.lora_param_count(64, 32, 4, 2)
    assert report["total"] == adapters.trainable_parameters(model)[1] == dense_total + report["trainable"]
