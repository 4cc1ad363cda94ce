"""lightlm.quant_outliers: LLM.int8()'s decomposition against float matmuls and float64 sums of torch-quantized
integers, SmoothQuant's scales against their closed form, the fold against the unfolded model (nn.LayerNorm, a
random transformers Llama, SmolLM2), and activation maxima against inputs computed by hand."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightlm.quant_linear import dynamic_int8_linear, quantize_per_row
from lightlm.quant_outliers import (activation_absmax, llm_int8_matmul, smooth_scales, smoothquant_fold,
                                    weight_absmax)

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors; two threads contend on a busy 2-core machine


def _data(tokens=32, width=48, out=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=generator), torch.randn(out, width, generator=generator) * 0.1


def _torch_int8_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 (scale max|row| / 127.5) with torch's fake-quantize op: (integer codes, scales)."""
    scale = (matrix.abs().amax(dim=1) / 127.5).clamp_min(torch.finfo(torch.float32).eps)
    zero = torch.zeros(matrix.shape[0], dtype=torch.int32)
    fake = torch.fake_quantize_per_channel_affine(matrix, scale, zero, 0, -128, 127)
    return torch.round(fake / scale[:, None]), scale


def _per_tensor_int8(x: torch.Tensor) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, (x.abs().max() / 127.5).item(), 0, -128, 127)


# --------------------------------------------------------------------------- LLM.int8()


def test_llm_int8_without_outliers_is_the_plain_int8_path():
    x, weight = _data()
    bias = torch.randn(24)
    ours, outliers = llm_int8_matmul(x, weight, threshold=float("inf"), bias=bias)
    assert outliers.numel() == 0
    assert torch.equal(ours, dynamic_int8_linear(x, *quantize_per_row(weight), bias))


def test_llm_int8_with_threshold_zero_is_the_float_matmul():
    x, weight = _data()
    x[:, [3, 17]] = 0.0  # all-zero columns are not outliers: they go through int8 and add exactly 0
    ours, outliers = llm_int8_matmul(x, weight, threshold=0.0)
    assert outliers.tolist() == [j for j in range(48) if j not in (3, 17)]
    torch.testing.assert_close(ours, x @ weight.t(), rtol=1e-6, atol=1e-6)


def test_llm_int8_keeps_planted_outlier_columns_and_cuts_the_error():
    x, weight = _data(tokens=64, width=96, out=32, seed=1)
    planted = [5, 40, 77]
    x[:, planted] *= 40.0  # a few features 40× larger in every token, as in large language models
    exact = x @ weight.t()
    plain = dynamic_int8_linear(x, *quantize_per_row(weight))
    ours, outliers = llm_int8_matmul(x, weight, threshold=6.0)
    assert outliers.tolist() == planted
    plain_error, our_error = (plain - exact).norm().item(), (ours - exact).norm().item()
    assert our_error < 0.1 * plain_error  # measured ratio 0.064 (relative errors 0.021 -> 0.0013)


@given(tokens=st.integers(1, 12), width=st.integers(1, 24), out=st.integers(1, 8),
       threshold=st.sampled_from([0.0, 0.5, 1.5, 2.5, float("inf")]), seed=st.integers(0, 2**16))
def test_llm_int8_is_the_float_part_plus_the_int8_part(tokens, width, out, threshold, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=generator) * 2
    weight = torch.randn(out, width, generator=generator)
    ours, outliers = llm_int8_matmul(x, weight, threshold)
    expected_outliers = [j for j in range(width) if max(abs(v) for v in x[:, j].tolist()) > threshold]
    assert outliers.tolist() == expected_outliers
    regular = [j for j in range(width) if j not in expected_outliers]
    float_part = x[:, expected_outliers] @ weight[:, expected_outliers].t()
    int8_part = torch.zeros(tokens, out)
    if regular:  # a_t · s_i · Σ_j P_tj Q_ij with torch's codes, the sums in float64 (exact)
        p, a = _torch_int8_rows(x[:, regular])
        q, s = _torch_int8_rows(weight[:, regular])
        int8_part = (p.double() @ q.double().t()).float() * a[:, None] * s
    torch.testing.assert_close(ours, float_part + int8_part, rtol=1e-6, atol=1e-6)


def test_llm_int8_keeps_leading_dimensions_and_dtype():
    x, weight = _data()
    ours, _ = llm_int8_matmul(x.reshape(4, 8, 48).to(torch.bfloat16), weight.to(torch.bfloat16))
    assert ours.shape == (4, 8, 24) and ours.dtype == torch.bfloat16


def test_llm_int8_rejects_bad_inputs():
    x, weight = _data()
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        llm_int8_matmul(x, weight, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold must be a number"):
        llm_int8_matmul(x, weight, threshold=float("nan"))
    with pytest.raises(TypeError, match="threshold must be a real number"):
        llm_int8_matmul(x, weight, threshold="6")
    with pytest.raises(ValueError, match="x has width 47"):
        llm_int8_matmul(x[:, :47], weight)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        llm_int8_matmul(x, weight[0])
    with pytest.raises(TypeError, match="x must be a floating-point"):
        llm_int8_matmul(x.long(), weight)
    with pytest.raises(ValueError, match="bias has 3 entries"):
        llm_int8_matmul(x, weight, bias=torch.zeros(3))
    x[0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        llm_int8_matmul(x, weight)


# --------------------------------------------------------------------------- SmoothQuant scales


def test_smooth_scales_follow_the_closed_form():
    act, weight = torch.tensor([4.0, 9.0, 0.0, 2.0]), torch.tensor([1.0, 4.0, 3.0, 0.0])
    torch.testing.assert_close(smooth_scales(act, weight), torch.tensor([2.0, 1.5, 1.0, 1.0]))  # √4/√1, √9/√4
    torch.testing.assert_close(smooth_scales(act, weight, alpha=1.0), torch.tensor([4.0, 9.0, 1.0, 1.0]))
    torch.testing.assert_close(smooth_scales(act, weight, alpha=0.0), torch.tensor([1.0, 0.25, 1.0, 1.0]))
    torch.testing.assert_close(smooth_scales(act, weight, alpha=0.75)[:2],
                               torch.tensor([4.0 ** 0.75 / 1.0 ** 0.25, 9.0 ** 0.75 / 4.0 ** 0.25]))


def test_smoothed_columns_share_one_maximum():
    # with α = 0.5 every column ends with max|X_j / s_j| = max|W_j · s_j| = √(max|X_j| · max|W_j|)
    act, weight = torch.rand(16) * 10 + 0.1, torch.rand(16) + 0.01
    scales = smooth_scales(act, weight)
    torch.testing.assert_close(act / scales, weight * scales)


def test_weight_absmax_takes_every_row_of_every_linear():
    linears = [nn.Linear(6, 4), nn.Linear(6, 3)]
    expected = torch.cat([linears[0].weight, linears[1].weight]).abs().amax(dim=0)
    assert torch.equal(weight_absmax(linears), expected.detach())
    with pytest.raises(ValueError, match="in_features differ"):
        weight_absmax([nn.Linear(6, 4), nn.Linear(5, 4)])
    with pytest.raises(TypeError, match="must be nn.Linear"):
        weight_absmax([nn.LayerNorm(6)])
    with pytest.raises(ValueError, match="at least one"):
        weight_absmax([])


def test_smooth_scales_reject_bad_inputs():
    act = torch.ones(4)
    with pytest.raises(ValueError, match="one entry per input column"):
        smooth_scales(act, torch.ones(5))
    with pytest.raises(ValueError, match="act_absmax must hold finite maxima"):
        smooth_scales(-act, act)
    with pytest.raises(ValueError, match="weight_absmax must hold finite maxima"):
        smooth_scales(act, torch.tensor([1.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        smooth_scales(act, act, alpha=1.5)
    with pytest.raises(TypeError, match="act_absmax must be a floating-point"):
        smooth_scales(torch.ones(4, dtype=torch.int64), act)
    with pytest.raises(ValueError, match="act_absmax must be 1-D"):
        smooth_scales(torch.ones(2, 2), act)


# --------------------------------------------------------------------------- the fold


def test_fold_into_a_layernorm_leaves_a_pre_norm_block_unchanged():
    torch.manual_seed(0)
    norm, first, second = nn.LayerNorm(16), nn.Linear(16, 8), nn.Linear(16, 5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(10, 16)
    original = copy.deepcopy(norm)
    before = [first(norm(x)), second(norm(x))]
    scales = torch.rand(16) * 4 + 0.25
    smoothquant_fold(norm, [first, second], scales)
    torch.testing.assert_close(norm(x), original(x) / scales)  # the norm now outputs X / s
    torch.testing.assert_close([first(norm(x)), second(norm(x))], before, rtol=1e-5, atol=1e-6)


def test_fold_rejects_bad_arguments():
    norm, linear = nn.LayerNorm(8), nn.Linear(8, 4)
    with pytest.raises(ValueError, match="must have a 1-D weight"):
        smoothquant_fold(nn.LayerNorm(8, elementwise_affine=False), [linear], torch.ones(8))
    with pytest.raises(ValueError, match="norm has width 6"):
        smoothquant_fold(nn.LayerNorm(6), [linear], torch.ones(8))
    with pytest.raises(ValueError, match="scales has 7 entries"):
        smoothquant_fold(norm, [linear], torch.ones(7))
    with pytest.raises(ValueError, match="finite and > 0"):
        smoothquant_fold(norm, [linear], torch.zeros(8))
    with pytest.raises(TypeError, match="norm must be a torch.nn.Module"):
        smoothquant_fold("norm", [linear], torch.ones(8))
    with pytest.raises(TypeError, match="must be nn.Linear"):
        smoothquant_fold(norm, [norm], torch.ones(8))


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # outlier features, as trained LLMs have them: a few norm channels 20× larger
        for layer in model.model.layers:
            layer.input_layernorm.weight[[7, 30, 51]] = 20.0
            layer.post_attention_layernorm.weight[[2, 44]] = 15.0
    return model


def _smooth_llama(model, batch, alpha=0.5):
    """SmoothQuant every block: input_layernorm → q, k, v; post_attention_layernorm → gate, up."""
    groups = []
    for i, layer in enumerate(model.model.layers):
        attention, mlp = layer.self_attn, layer.mlp
        groups += [(layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj],
                    f"model.layers.{i}.self_attn.q_proj"),
                   (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], f"model.layers.{i}.mlp.gate_proj")]
    absmax = activation_absmax(model, [batch], [name for _, _, name in groups])
    for norm, linears, name in groups:
        smoothquant_fold(norm, linears, smooth_scales(absmax[name], weight_absmax(linears), alpha))


def _qkv_int8_error(layer, x) -> float:
    """Relative error that per-tensor int8 activations add to the q, k, v outputs (weights kept in float)."""
    weight = torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight])
    exact = x @ weight.t()
    return ((_per_tensor_int8(x) @ weight.t() - exact).norm() / exact.norm()).item()


def _qkv_input(model, layer_index, batch) -> torch.Tensor:
    captured = {}
    projection = model.model.layers[layer_index].self_attn.q_proj
    handle = projection.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0].detach()))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return captured["x"]


def test_fold_leaves_a_transformers_llama_unchanged_and_flattens_its_activations():
    model = _tiny_llama()
    assert type(model.model.layers[0].input_layernorm).__name__ == "LlamaRMSNorm"
    batch = {"input_ids": torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))}
    with torch.no_grad():
        before = model(**batch).logits
    error_before = _qkv_int8_error(model.model.layers[1], _qkv_input(model, 1, batch))
    _smooth_llama(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=1e-4, atol=1e-5)
    error_after = _qkv_int8_error(model.model.layers[1], _qkv_input(model, 1, batch))
    assert error_after < 0.5 * error_before  # measured 0.030 -> 0.0081


def test_fold_leaves_a_smollm2_decoder_layer_unchanged_and_cuts_the_int8_error(smollm2):
    tokenizer, model = smollm2
    batch = dict(tokenizer(["The quick brown fox jumps over the lazy dog. Quantization stores numbers in fewer "
                            "bits.", "Large language models have outlier features in a few hidden dimensions."],
                           return_tensors="pt", padding=True))
    index = 12  # its input_layernorm output has a feature 33× its median maximum
    original = model.model.layers[index]
    with torch.no_grad():
        before = model(**batch).logits
    x = _qkv_input(model, index, batch)
    error_before = _qkv_int8_error(original, x)
    smoothed = copy.deepcopy(original)  # the session's model is shared: fold a copy, swap it in, swap it back
    attention, mlp = smoothed.self_attn, smoothed.mlp
    absmax = activation_absmax(model, [batch], [f"model.layers.{index}.self_attn.q_proj",
                                                f"model.layers.{index}.mlp.gate_proj"])
    for norm, linears, name in ((smoothed.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj],
                                 "self_attn.q_proj"), (smoothed.post_attention_layernorm,
                                                       [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj")):
        smoothquant_fold(norm, linears, smooth_scales(absmax[f"model.layers.{index}.{name}"],
                                                      weight_absmax(linears)))
    model.model.layers[index] = smoothed
    try:
        with torch.no_grad():
            after = model(**batch).logits
        error_after = _qkv_int8_error(smoothed, _qkv_input(model, index, batch))
    finally:
        model.model.layers[index] = original
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert error_after < 0.5 * error_before  # measured 0.066 -> 0.013


# --------------------------------------------------------------------------- activation maxima


def test_activation_absmax_is_the_column_maximum_of_each_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [torch.randn(4, 5, 6), torch.randn(2, 6) * 3]
    absmax = activation_absmax(model, batches)
    assert set(absmax) == {"0", "2"}
    inputs = [torch.cat([b.reshape(-1, 6) for b in batches])]
    inputs.append(torch.relu(inputs[0] @ model[0].weight.t() + model[0].bias))
    for name, x in zip(("0", "2"), inputs):
        torch.testing.assert_close(absmax[name], x.abs().amax(dim=0).detach())
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks  # the hooks are removed
    assert set(activation_absmax(model, batches[0], names=["1"])) == {"1"}  # any module, one batch


def test_activation_absmax_rejects_bad_arguments():
    model = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(ValueError, match=r"'decoder' is not a module of the model; its Linears include \['0'\]"):
        activation_absmax(model, [torch.randn(2, 6)], names=["decoder"])
    with pytest.raises(TypeError, match="names must be module names"):
        activation_absmax(model, [torch.randn(2, 6)], names=[0])
    with pytest.raises(TypeError, match="batches must be a non-empty list"):
        activation_absmax(model, [])
    with pytest.raises(TypeError, match="each batch must be a tensor or a dict"):
        activation_absmax(model, [[1.0]])
    with pytest.raises(ValueError, match="no module to observe"):
        activation_absmax(nn.Sequential(nn.ReLU()), [torch.randn(2, 6)])
