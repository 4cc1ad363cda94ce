"""lightlm.prune_calib: Wanda against a direct computation and against the reference code's procedure, SparseGPT
against the closed-form least-squares solution and against magnitude pruning on a real MiniLM layer with real
activations, and the sequential driver against layer-by-layer recomputation."""

import numpy as np
import pytest
import torch
from torch import nn

from lightlm import prune, prune_calib

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- Wanda


def test_wanda_mask_equals_a_direct_computation():
    weight, x = _randn(6, 10, seed=1), _randn(3, 7, 10, seed=2) * torch.linspace(0.1, 5, 10, dtype=torch.float64)
    tokens = x.reshape(-1, 10)
    norms = torch.tensor([float(np.sqrt(sum(float(t[j]) ** 2 for t in tokens))) for j in range(10)],
                         dtype=torch.float64)
    scores = weight.abs() * norms
    torch.testing.assert_close(prune_calib.wanda_scores(weight, x), scores)
    expected = torch.ones(6, 10, dtype=torch.bool)
    for i in range(6):
        expected[i, np.argsort(scores[i].numpy(), kind="stable")[:round(0.4 * 10)]] = False
    assert torch.equal(prune_calib.wanda_mask(weight, x, 0.4), expected)
    assert (prune_calib.wanda_mask(weight, x, 0.4).sum(1) == 6).all()


def test_wanda_mask_follows_the_reference_procedure():
    """Wanda's code: a running mean of ‖x_j‖² per batch, S = |W|·sqrt(that), a stable sort of each row, and
    int(cols·s) pruned — the same mask whenever cols·s is whole (here 16·0.5)."""
    weight = _randn(8, 16, seed=3, dtype=torch.float32)
    batches = [_randn(1, 5, 16, seed=s, dtype=torch.float32) for s in range(4)]
    scaler, count = torch.zeros(16), 0
    for b in batches:
        x = b.reshape(-1, 16).T
        scaler *= count / (count + 1)
        count += 1
        scaler += torch.norm(x, p=2, dim=1) ** 2 / count
    metric = weight.abs() * torch.sqrt(scaler.reshape(1, -1))
    reference = torch.zeros_like(metric, dtype=torch.bool)  # True = pruned, as in their code
    reference.scatter_(1, torch.sort(metric, dim=-1, stable=True)[1][:, :int(16 * 0.5)], True)
    assert torch.equal(prune_calib.wanda_mask(weight, torch.cat(batches), 0.5), ~reference)


def test_wanda_nm_mask_is_nm_of_the_scores():
    weight, x = _randn(4, 8, seed=4), _randn(20, 8, seed=5)
    mask = prune_calib.wanda_mask(weight, x, n=2, m=4)
    assert torch.equal(mask, prune.nm_mask(prune_calib.wanda_scores(weight, x), 2, 4))
    assert (mask.view(4, 2, 4).sum(-1) == 2).all()


# --------------------------------------------------------------------------- SparseGPT


def _damped(h, damp=0.01):
    return h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def test_sparsegpt_with_a_prefix_mask_is_the_least_squares_optimum():
    """Pruning columns 0..5 (across blocks of 4): the OBS updates must give the closed form
    Ŵ_F = W_F + W_P H_PF H_FF⁻¹ (H dampened), the exact minimiser of (W − Ŵ) H (W − Ŵ)ᵀ with Ŵ_P = 0."""
    weight, x = _randn(5, 10, seed=6), _randn(40, 10, seed=7)
    h = prune_calib.hessian(x)
    torch.testing.assert_close(h, 2 * x.T @ x / 40)
    mask = torch.ones(5, 10, dtype=torch.bool)
    mask[:, :6] = False
    new, keep = prune_calib.sparsegpt_prune(weight, h, mask=mask, blocksize=4)
    hd = _damped(h)
    expected = torch.zeros_like(weight)
    expected[:, 6:] = weight[:, 6:] + weight[:, :6] @ hd[:6, 6:] @ torch.linalg.inv(hd[6:, 6:])
    torch.testing.assert_close(new, expected)
    assert torch.equal(keep, mask) and (new[:, :6] == 0).all()


def test_sparsegpt_fixed_mask_lies_between_plain_masking_and_the_optimum():
    weight, x = _randn(6, 12, seed=8), _randn(60, 12, seed=9)
    h, hd = prune_calib.hessian(x), _damped(prune_calib.hessian(x))
    mask = prune.magnitude_mask(weight, 0.5)

    def error(w):
        d = weight - w
        return float(torch.einsum("ij,jk,ik->", d, hd, d))

    optimum = weight * mask
    for i in range(6):  # row by row: free weights solve H_FF δ = −H_FP δ_P
        p, f = ~mask[i], mask[i]
        optimum[i, f] = weight[i, f] + weight[i, p] @ hd[p][:, f] @ torch.linalg.inv(hd[f][:, f])
    new, _ = prune_calib.sparsegpt_prune(weight, h, mask=mask, blocksize=5)
    assert error(optimum) <= error(new) + 1e-9 < error(weight * mask)


def test_sparsegpt_masks_have_the_asked_counts_and_zero_sparsity_changes_nothing():
    weight, h = _randn(8, 16, seed=10), prune_calib.hessian(_randn(50, 16, seed=11))
    new, keep = prune_calib.sparsegpt_prune(weight, h, 0.5, blocksize=4)
    assert all(int((~keep[:, b:b + 4]).sum()) == 16 for b in range(0, 16, 4))  # round(0.5 · 32) per block
    assert torch.equal(new == 0, ~keep)
    new, keep = prune_calib.sparsegpt_prune(weight, h, n=2, m=4, blocksize=8)
    assert (keep.view(8, 4, 4).sum(-1) == 2).all() and torch.equal(new == 0, ~keep)
    same, keep = prune_calib.sparsegpt_prune(weight, h, 0.0)
    assert keep.all() and torch.equal(same, weight)


def test_sparsegpt_beats_magnitude_at_the_same_density_on_correlated_inputs():
    weight = _randn(16, 32, seed=12, dtype=torch.float32)
    x = _randn(256, 8, seed=13, dtype=torch.float32) @ _randn(8, 32, seed=14, dtype=torch.float32)
    x = x + 0.1 * _randn(256, 32, seed=15, dtype=torch.float32)
    new, keep = prune_calib.sparsegpt_prune(weight, prune_calib.hessian(x), 0.5)
    magnitude = weight * prune.magnitude_mask(weight, 0.5)
    assert int((~keep).sum()) == int((magnitude == 0).sum()) == 256
    assert torch.linalg.norm(x @ (weight - new).T) < 0.5 * torch.linalg.norm(x @ (weight - magnitude).T)


# --------------------------------------------------------------------------- the sequential driver


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_sequential_calibrates_each_layer_on_the_pruned_layers_before_it(method):
    model, reference = _mlp(), _mlp()
    batches = [_randn(10, 8, seed=s, dtype=torch.float32) for s in range(3)]
    calls = []
    model[4].register_forward_hook(lambda *args: calls.append(1))
    masks = prune_calib.prune_sequential(model, batches, method, 0.5, blocksize=4)
    assert list(masks) == ["0", "2", "4"]
    assert len(calls) == 1 + 3  # one forward finds the groups; then the forwards stop early, so the last layer
    # runs only for its own group (3 batches), not for the groups before it
    x = torch.cat(batches)
    unpruned_inputs = reference[1](reference[0](x))
    for index in (0, 2, 4):  # redo it by hand, layer after layer
        layer = reference[index]
        inputs = reference[:index](x)
        if method == "wanda":
            mask = prune_calib.wanda_mask(layer.weight, inputs, 0.5)
            new = layer.weight * mask
        else:
            new, mask = prune_calib.sparsegpt_prune(layer.weight, prune_calib.hessian(inputs), 0.5, blocksize=4)
        assert torch.equal(masks[str(index)], mask)
        torch.testing.assert_close(model[index].weight, new)
        with torch.no_grad():
            layer.weight.copy_(new)
    assert not torch.equal(reference[1](reference[0](x)), unpruned_inputs)  # the next layer saw pruned inputs


def test_prune_sequential_on_a_tiny_llama_with_dict_batches():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))
    groups = prune_calib.linear_groups(model, {"input_ids": ids})
    assert groups[:4] == [[f"model.layers.0.self_attn.{p}_proj" for p in "qkv"], ["model.layers.0.self_attn.o_proj"],
                          ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
                          ["model.layers.0.mlp.down_proj"]]
    head = model.lm_head.weight.detach().clone()
    masks = prune_calib.prune_sequential(model, [{"input_ids": ids, "use_cache": False}], "wanda", n=2, m=4)
    assert len(masks) == 14 and "lm_head" not in masks
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight == 0, ~mask) and (mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all()
    assert torch.equal(model.lm_head.weight, head)


# --------------------------------------------------------------------------- bad inputs


def test_bad_calibration_inputs_raise_clear_errors():
    weight = torch.randn(4, 8)
    with pytest.raises(ValueError, match="inputs have width 6 but the weight"):
        prune_calib.wanda_mask(weight, torch.randn(5, 6), 0.5)
    with pytest.raises(ValueError, match=r"hessian must be \(8, 8\)"):
        prune_calib.sparsegpt_prune(weight, torch.eye(6), 0.5)
    with pytest.raises(ValueError, match="either sparsity .* or both n and m"):
        prune_calib.wanda_mask(weight, torch.randn(5, 8), 0.5, n=2, m=4)
    with pytest.raises(ValueError, match="either sparsity"):
        prune_calib.sparsegpt_prune(weight, torch.eye(8))
    with pytest.raises(ValueError, match="n must be <= m"):
        prune_calib.sparsegpt_prune(weight, torch.eye(8), n=4, m=2)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        prune_calib.wanda_mask(weight, torch.randn(5, 8), 1.5)
    with pytest.raises(ValueError, match="multiples of m=4"):
        prune_calib.sparsegpt_prune(weight, torch.eye(8), n=2, m=4, blocksize=6)
    with pytest.raises(ValueError, match="not positive definite"):
        prune_calib.sparsegpt_prune(weight, -torch.eye(8), 0.5)
    model = _mlp()
    with pytest.raises(ValueError, match="unknown module name 'fc1'"):
        prune_calib.prune_sequential(model, [torch.randn(2, 8)], "wanda", 0.5, groups=["fc1"])
    with pytest.raises(ValueError, match=r"named twice in groups: \['2'\]"):
        prune_calib.prune_sequential(model, [torch.randn(2, 8)], "wanda", 0.5, groups=[["0", "2"], "2"])
    with pytest.raises(TypeError, match="not an nn.Linear"):
        prune_calib.prune_sequential(model, [torch.randn(2, 8)], "wanda", 0.5, groups=["1"])
    with pytest.raises(TypeError, match="calibration must be a non-empty list"):
        prune_calib.prune_sequential(model, [], "wanda", 0.5)
    with pytest.raises(ValueError, match="method must be one of"):
        prune_calib.prune_sequential(model, [torch.randn(2, 8)], "obs", 0.5)
    with pytest.raises(RuntimeError):  # the model itself refuses inputs of the wrong width
        prune_calib.prune_sequential(model, [torch.randn(2, 5)], "wanda", 0.5)


# --------------------------------------------------------------------------- a real layer


def _minilm_activations(tokenizer, model, sentences):
    """Inputs of layer 0's intermediate.dense (384 wide) at the real (non-padding) tokens."""
    captured = []
    hook = model.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, i, o: captured.append(i[0]))
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    hook.remove()
    return captured[0][batch["attention_mask"].bool()]


def test_sparsegpt_beats_magnitude_on_a_real_minilm_layer(minilm):
    from lightlm.data import movie_plot_sentences

    tokenizer, model = minilm
    sentences = movie_plot_sentences()
    x = _minilm_activations(tokenizer, model, sentences[:48])
    held_out = _minilm_activations(tokenizer, model, sentences[48:72])
    assert x.shape[0] > 2 * 384  # more tokens than inputs: H has full rank
    weight = model.encoder.layer[0].intermediate.dense.weight.detach()
    h = prune_calib.hessian(x)

    def error(w, inputs=x):
        return float(torch.linalg.norm(inputs @ (weight - w).T) / torch.linalg.norm(inputs @ weight.T))

    for kwargs, magnitude in (({"sparsity": 0.5}, prune.magnitude_mask(weight, 0.5)),
                              ({"n": 2, "m": 4}, prune.nm_mask(weight.abs(), 2, 4))):
        new, keep = prune_calib.sparsegpt_prune(weight, h, **kwargs)
        assert int((~keep).sum()) == int((~magnitude).sum()) == weight.numel() // 2
        assert error(new) < error(weight * magnitude)
        assert error(new, held_out) < error(weight * magnitude, held_out)
