"""lightlm.reparam: every fold, fusion and merge leaves outputs unchanged (assert_close against the unmodified
modules): on real SmolLM2 decoder layers (pre-norm: the whole layer is unchanged), on real MiniLM layers (post-norm:
the Linear's output is unchanged, the layer's is not, because the residual reads the norm), on a small random Llama
model end to end, and on toy modules where each equation is written out."""

import copy

import pytest
import torch
from torch import nn

from lightlm import reparam

from conftest import seeded_linear, seeded_randn

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


_randn, _linear = seeded_randn, seeded_linear


def _double(value):
    """Float tensors (also inside tuples, lists and dicts) in float64; the rest unchanged."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_double(v) for v in value)
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    return value


def _captured_call(model, module, **inputs):
    """The arguments ``module`` receives in one forward of ``model`` (float64), to call copies of it again."""
    seen = {}

    def hook(mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return _double(seen["args"]), _double(seen["kwargs"])


def _output(module, args, kwargs):
    with torch.no_grad():
        result = module(*args, **kwargs)
    return result[0] if isinstance(result, tuple) else result


# --------------------------------------------------------------------------- toy modules, equation by equation


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_fold_matches_the_equation_and_resets_the_norm(bias):
    norm = nn.LayerNorm(10, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(_randn(10, seed=1))
        norm.bias.copy_(_randn(10, seed=2))
    linear, x = _linear(10, 6, seed=3, bias=bias), _randn(4, 10, seed=4)
    gamma, beta, weight = norm.weight.detach().clone(), norm.bias.detach().clone(), linear.weight.detach().clone()
    old_bias = linear.bias.detach().clone() if bias else 0
    expected = linear(norm(x))
    reparam.fold_norm_into_linear(norm, linear)
    torch.testing.assert_close(linear(norm(x)), expected)
    torch.testing.assert_close(linear.weight, weight * gamma)                 # W diag γ
    torch.testing.assert_close(linear.bias, weight @ beta + old_bias)     # b + W β
    assert torch.equal(norm.weight, torch.ones(10, dtype=torch.float64))
    assert torch.equal(norm.bias, torch.zeros(10, dtype=torch.float64))


def test_rmsnorm_fold_into_several_linears_resets_gamma_once():
    norm = nn.RMSNorm(8, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(_randn(8, seed=5))
    linears = [_linear(8, 4, seed=6, bias=False), _linear(8, 2, seed=7, bias=False), _linear(8, 2, seed=8)]
    x = _randn(3, 8, seed=9)
    expected = [linear(norm(x)) for linear in linears]
    reparam.fold_norm_into_linear(norm, linears)
    for linear, out in zip(linears, expected):
        torch.testing.assert_close(linear(norm(x)), out)
    assert linears[0].bias is None  # an RMSNorm has no β: no bias appears


def test_merge_parallel_branches_repvgg_style():
    a, b, x = _linear(6, 6, seed=10), _linear(6, 6, seed=11, bias=False), _randn(5, 6, seed=12)
    merged = reparam.merge_parallel_linears([a, b, nn.Identity()])
    torch.testing.assert_close(merged(x), a(x) + b(x) + x)
    torch.testing.assert_close(merged.weight, a.weight + b.weight + torch.eye(6, dtype=torch.float64))


def test_fuse_zero_fills_a_missing_bias_and_unfuse_round_trips():
    parts = [_linear(5, 3, seed=13), _linear(5, 2, seed=14, bias=False), _linear(5, 4, seed=15)]
    fused, x = reparam.fuse_linears(parts), _randn(2, 5, seed=16)
    for part, out in zip(parts, fused(x).split([3, 2, 4], dim=-1)):
        torch.testing.assert_close(out, part(x))
    assert torch.equal(fused.bias[3:5], torch.zeros(2, dtype=torch.float64))
    for part, back in zip(parts, reparam.unfuse_linear(fused, [3, 2, 4])):
        assert torch.equal(back.weight, part.weight)


def test_new_modules_keep_the_dtype_and_device():
    parts = [_linear(4, 3, seed=17, dtype=torch.bfloat16), _linear(4, 3, seed=18, dtype=torch.bfloat16)]
    for module in (reparam.fuse_linears(parts), reparam.merge_parallel_linears(parts),
                   *reparam.unfuse_linear(reparam.fuse_linears(parts), [3, 3])):
        assert module.weight.dtype == torch.bfloat16 and module.weight.device == parts[0].weight.device
    assert torch.equal(reparam.fuse_linears(parts).weight, torch.cat([parts[0].weight, parts[1].weight]))


# --------------------------------------------------------------------------- SmolLM2 (pre-norm): layers unchanged


def test_folding_smollm2_norms_leaves_a_real_decoder_layer_unchanged(smollm2):
    tokenizer, model = smollm2
    ids = tokenizer("The projection folds the norm into the weights.", return_tensors="pt")["input_ids"]
    layer = model.model.layers[2]
    args, kwargs = _captured_call(model, layer, input_ids=ids, use_cache=False)
    original = copy.deepcopy(layer).double()
    folded = copy.deepcopy(original)
    attention, mlp = folded.self_attn, folded.mlp
    reparam.fold_norm_into_linear(folded.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj])
    reparam.fold_norm_into_linear(folded.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    assert not torch.equal(folded.mlp.up_proj.weight, original.mlp.up_proj.weight)
    torch.testing.assert_close(_output(folded, args, kwargs), _output(original, args, kwargs))


def test_fused_qkv_and_merged_branches_of_smollm2_give_the_same_projections(smollm2):
    tokenizer, model = smollm2
    ids = tokenizer("Three projections, one matmul.", return_tensors="pt")["input_ids"]
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    (x,), _ = _captured_call(model, attention.q_proj, input_ids=ids, use_cache=False)
    projections = [copy.deepcopy(m).double() for m in (attention.q_proj, attention.k_proj, attention.v_proj)]
    fused = reparam.fuse_linears(projections)
    assert (fused.out_features, fused.bias) == (576 + 192 + 192, None)  # grouped-query attention, no biases
    with torch.no_grad():
        for out, projection in zip(fused(x).split([576, 192, 192], dim=-1), projections):
            torch.testing.assert_close(out, projection(x))
        gate, up = (copy.deepcopy(m).double() for m in (mlp.gate_proj, mlp.up_proj))
        torch.testing.assert_close(reparam.merge_parallel_linears([gate, up])(x), gate(x) + up(x))
    for back, projection in zip(reparam.unfuse_linear(fused, [576, 192, 192]), projections):
        assert torch.equal(back.weight, projection.weight) and back.bias is None


def test_folding_a_residual_scale_into_smollm2s_down_projection(smollm2):
    tokenizer, model = smollm2
    ids = tokenizer("A scaled residual branch.", return_tensors="pt")["input_ids"]
    mlp = copy.deepcopy(model.model.layers[1].mlp).double()
    (x,), _ = _captured_call(model, model.model.layers[1].mlp, input_ids=ids, use_cache=False)
    with torch.no_grad():
        expected = x + 0.3 * mlp(x)                                           # y = x + α·f(x)
        reparam.fold_residual_scale(mlp.down_proj, 0.3)
        torch.testing.assert_close(x + mlp(x), expected)


def test_folding_every_norm_of_a_small_llama_leaves_its_logits_unchanged():
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:  # freshly initialised norms have γ = 1: nothing to fold
                parameter.copy_(0.5 + torch.rand_like(parameter))
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        reparam.fold_norm_into_linear(layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj])
        reparam.fold_norm_into_linear(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    reparam.fold_norm_into_linear(model.model.norm, model.lm_head)  # untied head: the embedding is not touched
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "norm" in n)


# --------------------------------------------------------------------------- MiniLM (post-norm)


def _minilm_call(minilm, module):
    tokenizer, model = minilm
    batch = tokenizer(["The residual stream reads the norm."], return_tensors="pt")
    return _captured_call(model, module, **batch)


def test_in_minilm_folding_keeps_the_linear_output_but_not_the_layer_because_the_residual_reads_the_norm(minilm):
    """BERT's attention.output.LayerNorm feeds intermediate.dense *and* the residual of output.LayerNorm."""
    _, model = minilm
    layer = model.encoder.layer[1]
    layer_args, layer_kwargs = _minilm_call(minilm, layer)
    (norm_input,), _ = _minilm_call(minilm, layer.attention.output.LayerNorm)
    original = copy.deepcopy(layer).double()
    folded = copy.deepcopy(original)
    reparam.fold_norm_into_linear(folded.attention.output.LayerNorm, folded.intermediate.dense)
    with torch.no_grad():
        torch.testing.assert_close(folded.intermediate.dense(folded.attention.output.LayerNorm(norm_input)),
                                   original.intermediate.dense(original.attention.output.LayerNorm(norm_input)))
    changed = (_output(folded, layer_args, layer_kwargs) - _output(original, layer_args, layer_kwargs)).abs().max()
    assert changed > 0.1


def test_fused_qkv_merged_branches_and_residual_scale_on_minilm(minilm):
    _, model = minilm
    attention = model.encoder.layer[0].attention.self
    (x,), _ = _minilm_call(minilm, attention.query)
    projections = [copy.deepcopy(m).double() for m in (attention.query, attention.key, attention.value)]
    fused = reparam.fuse_linears(projections)
    layer = copy.deepcopy(model.encoder.layer[0]).double()
    with torch.no_grad():
        for out, projection in zip(fused(x).split(384, dim=-1), projections):
            torch.testing.assert_close(out, projection(x))
        query, key = projections[:2]
        torch.testing.assert_close(reparam.merge_parallel_linears([query, key])(x), query(x) + key(x))
        expected = x + 0.5 * layer.output.dense(layer.intermediate(x))     # y = x + α·FFN(x)
        reparam.fold_residual_scale(layer.output.dense, 0.5)
        torch.testing.assert_close(x + layer.output.dense(layer.intermediate(x)), expected)
    for back, projection in zip(reparam.unfuse_linear(fused, [384] * 3), projections):
        assert torch.equal(back.weight, projection.weight) and torch.equal(back.bias, projection.bias)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call, error, message", [
    (lambda: reparam.fold_norm_into_linear(nn.LayerNorm(4, elementwise_affine=False), _linear(4, 2)), ValueError,
     "no 1-D weight"),
    (lambda: reparam.fold_norm_into_linear(nn.LayerNorm(4), _linear(5, 2)), ValueError, "norm has width 4"),
    (lambda: reparam.fold_norm_into_linear(nn.LayerNorm(4), nn.ReLU()), TypeError, "linear must be nn.Linear"),
    (lambda: reparam.fold_norm_into_linear("norm", _linear(4, 2)), TypeError, "norm must be a torch.nn.Module"),
    (lambda: reparam.fold_norm_into_linear(nn.LayerNorm(4), []), ValueError, "at least one nn.Linear"),
    (lambda: reparam.fold_norm_into_linear(nn.LayerNorm(4), 3), TypeError, "an nn.Linear or a list of them"),
    (lambda: (lambda m: reparam.fold_norm_into_linear(nn.LayerNorm(4), [m, m]))(_linear(4, 2)), ValueError,
     "the same module twice"),
    (lambda: reparam.fuse_linears([_linear(4, 2), _linear(5, 2)]), ValueError, r"in_features differ: \[4, 5\]"),
    (lambda: reparam.fuse_linears([_linear(4, 2), _linear(4, 2, dtype=torch.float32)]), ValueError,
     "one device and dtype"),
    (lambda: reparam.unfuse_linear(_linear(4, 6), [2, 3]), ValueError, r"add up to fused.out_features = 6"),
    (lambda: reparam.unfuse_linear(_linear(4, 6), [6, 0]), ValueError, r"sizes\[i\] must be >= 1, got 0"),
    (lambda: reparam.unfuse_linear(_linear(4, 6), "6"), TypeError, "sizes must be a list of ints"),
    (lambda: reparam.unfuse_linear(nn.ReLU(), [6]), TypeError, "fused must be an nn.Linear"),
    (lambda: reparam.merge_parallel_linears([_linear(4, 2), _linear(4, 3)]), ValueError, "one \\(out, in\\) shape"),
    (lambda: reparam.merge_parallel_linears([_linear(4, 2), nn.Identity()]), ValueError, "needs in = out"),
    (lambda: reparam.merge_parallel_linears([nn.Identity()]), ValueError, "an identity alone has no shape"),
    (lambda: reparam.merge_parallel_linears([_linear(4, 4), nn.ReLU()]), TypeError, "nn.Linear or nn.Identity"),
    (lambda: reparam.fold_residual_scale(_linear(4, 4), float("nan")), ValueError, "alpha must be a number"),
    (lambda: reparam.fold_residual_scale(_linear(4, 4), "2"), TypeError, "alpha must be a real number"),
    (lambda: reparam.fold_residual_scale(nn.Identity(), 2.0), TypeError, "linear must be an nn.Linear"),
])
def test_rejects_bad_input_with_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
