"""lightlm.prune against torch.nn.utils.prune (masks, global masks, reparametrisation, relative amounts),
torch.ao.pruning's CubicSL formula, loop-by-loop N:M masks, and hypothesis properties (zero count, idempotence)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightlm import prune

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

SPARSITIES = [0.0, 0.1, 0.25, 0.37, 0.5, 0.75, 0.9, 0.99]


def _tie_free(*shape, seed=0):
    """Weights with all |w| distinct: a random permutation of 1..n with random signs, scaled."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (torch.randperm(n, generator=g).float().add(1) * signs / n).view(shape)


def _linear(out_features=6, in_features=8, seed=0):
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(_tie_free(out_features, in_features, seed=seed))
        layer.bias.copy_(torch.linspace(-0.5, 0.5, out_features))
    return layer


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_magnitude_mask_equals_torch_l1_unstructured(sparsity):
    layer = _linear(7, 9, seed=1)
    torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
    mask = prune.magnitude_mask(layer.weight_orig, sparsity)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, layer.weight_mask.bool())
    assert int((~mask).sum()) == round(sparsity * 63)


def test_magnitude_mask_ties_prune_the_lower_flat_index_first():
    weight = torch.tensor([[2.0, -1.0, 5.0], [1.0, 1.0, -2.0]])  # |w| = 1 at flat 1, 3, 4; 2 at 0, 5
    assert prune.magnitude_mask(weight, 2 / 6).tolist() == [[True, False, True], [False, True, True]]
    assert prune.magnitude_mask(weight, 4 / 6).tolist() == [[False, False, True], [False, False, True]]
    # the threshold rule of some course code (prune every |w| <= the k-th smallest) would prune 3 at k = 2
    threshold = weight.abs().flatten().sort().values[1]
    assert int((weight.abs() <= threshold).sum()) == 3
    # numpy's stable argsort, an independent ranking, picks the same entries
    order = np.argsort(weight.abs().flatten().numpy(), kind="stable")[:2]
    assert sorted(order.tolist()) == [1, 3]


def test_n_pruned_uses_pythons_round_like_torch():
    assert prune.n_pruned(10, 0.37) == 4  # floor would give 3
    assert prune.n_pruned(5, 0.5) == 2  # half to even
    assert prune.n_pruned(7, 0.5) == 4
    assert torch_prune._compute_nparams_toprune(0.5, 5) == 2 and torch_prune._compute_nparams_toprune(0.37, 10) == 4


@pytest.mark.parametrize("sparsity", [0.2, 0.5, 0.8])
def test_global_masks_equal_torch_global_unstructured(sparsity):
    layers = [_linear(5, 4, seed=2), _linear(3, 6, seed=3), _linear(8, 2, seed=4)]
    with torch.no_grad():
        layers[1].weight.mul_(math.pi)  # different scales (no ties across layers): different sparsities per layer
        layers[2].weight.mul_(math.e / 2)
    ours = prune.global_magnitude_masks({f"l{i}": m.weight for i, m in enumerate(layers)}, sparsity)
    torch_prune.global_unstructured([(m, "weight") for m in layers], torch_prune.L1Unstructured, amount=sparsity)
    for i, layer in enumerate(layers):
        assert torch.equal(ours[f"l{i}"], layer.weight_mask.bool())
    assert sum(int((~m).sum()) for m in ours.values()) == round(sparsity * 54)
    assert len({round(float((~m).float().mean()), 3) for m in ours.values()}) > 1


def test_row_mask_prunes_the_same_count_in_every_row():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    assert prune.row_mask(scores, 0.5).tolist() == [[False, False, True, True], [False, False, True, True]]
    assert prune.magnitude_mask(scores, 0.5).tolist() == [[False] * 4, [True] * 4]  # per tensor: one row emptied


def _nm_reference(scores, n, m):
    """Loop over rows and groups: keep the n largest (numpy stable sort of the negated scores... of ascending)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            group = scores[r, g:g + m].numpy()
            pruned = np.argsort(group, kind="stable")[: m - n]
            for j in range(m):
                keep[r, g + j] = j not in pruned
    return keep


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_nm_mask_equals_a_loop_over_groups(n, m):
    scores = _tie_free(5, 24, seed=5).abs()
    mask = prune.nm_mask(scores, n, m)
    assert torch.equal(mask, _nm_reference(scores, n, m))
    assert (mask.view(5, -1, m).sum(-1) == n).all()


def test_nm_mask_ties_and_groups_along_inputs():
    assert prune.nm_mask(torch.ones(1, 4), 2, 4).tolist() == [[False, False, True, True]]
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert prune.nm_mask(scores, 2, 4).tolist() == [[False, False, True, True], [True, True, False, False]]


# --------------------------------------------------------------------------- reparametrisation


def test_apply_mask_trains_like_torchs_custom_from_mask():
    """Same layout as torch's (weight_orig, weight_mask, pre-hook) and the same trajectory under AdamW with
    weight decay; pruned weights stay zero through the optimizer steps; remove() makes it permanent."""
    ours, theirs = _linear(seed=6), _linear(seed=6)
    mask = prune.magnitude_mask(ours.weight, 0.5)
    prune.apply_mask(ours, "weight", mask)
    torch_prune.custom_from_mask(theirs, "weight", mask)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight_orig", "weight_mask", "bias"}
    assert prune.is_pruned(ours) and not isinstance(ours.weight, nn.Parameter)
    optimizers = [torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1) for layer in (ours, theirs)]
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        for layer, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            layer(x).square().mean().backward()
            optimizer.step()
        torch.testing.assert_close(ours.weight_orig, theirs.weight_orig)
        ours(x)
        assert (ours.weight[~mask] == 0).all()
    prune.remove(ours, "weight")
    torch_prune.remove(theirs, "weight")
    assert set(ours.state_dict()) == {"weight", "bias"} and not prune.is_pruned(ours)
    torch.testing.assert_close(ours.weight, theirs.weight)
    assert isinstance(ours.weight, nn.Parameter) and (ours.weight[~mask] == 0).all()


def test_relative_amounts_compound_like_torch_but_cumulative_sparsity_does_not():
    theirs, relative, cumulative = _linear(10, 10, seed=7), _linear(10, 10, seed=7), _linear(10, 10, seed=7)
    for _ in range(2):
        torch_prune.l1_unstructured(theirs, "weight", amount=0.2)
        prune.magnitude_prune(relative, "weight", 0.2, relative=True)
    assert torch.equal(relative.weight_mask, theirs.weight_mask)
    assert float((theirs.weight == 0).float().mean()) == pytest.approx(0.36)  # 1 − 0.8²
    prune.magnitude_prune(cumulative, "weight", 0.2)
    prune.magnitude_prune(cumulative, "weight", 0.2)  # the same target again: nothing more
    assert float((cumulative.weight == 0).float().mean()) == pytest.approx(0.2)
    prune.magnitude_prune(cumulative, "weight", 0.36)
    assert torch.equal(cumulative.weight_mask, theirs.weight_mask)
    with pytest.raises(ValueError, match="only grows"):
        prune.magnitude_prune(cumulative, "weight", 0.1)


def test_masks_grow_monotonically_after_training_moves_weights():
    layer = _linear(seed=8)
    first = prune.magnitude_prune(layer, "weight", 0.3)
    with torch.no_grad():
        layer.weight_orig.mul_(torch.linspace(0.1, 3.0, 48).view(6, 8))  # magnitudes reorder
    second = prune.magnitude_prune(layer, "weight", 0.6)
    assert not (second & ~first).any()  # nothing pruned before comes back
    assert int((~second).sum()) == round(0.6 * 48)


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("initial, final, start, n_steps, interval", [(0.0, 0.5, 0, 10, 1), (0.1, 0.9, 5, 4, 3),
                                                                      (0.0, 0.8, 2, 7, 10)])
def test_cubic_sparsity_equals_torch_ao_cubicsl(initial, final, start, n_steps, interval):
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

    for step in range(-3, start + n_steps * interval + 5):
        expected = CubicSL.sparsity_compute_fn(s_0=initial, s_f=final, t=step, t_0=start, dt=interval, n=n_steps)
        assert prune.cubic_sparsity(step, initial, final, start, n_steps, interval) == pytest.approx(expected,
                                                                                                    abs=1e-15)
    assert prune.cubic_sparsity(start, initial, final, start, n_steps, interval) == initial
    assert prune.cubic_sparsity(start + n_steps * interval, initial, final, start, n_steps, interval) == final


def test_cubic_sparsity_prunes_fastest_early():
    values = [prune.cubic_sparsity(t, 0.0, 0.8, 0, 10, 1) for t in range(11)]
    steps = np.diff(values)
    assert (steps > 0).all() and (np.diff(steps) < 0).all()


# --------------------------------------------------------------------------- reports and scans


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4)).eval()


def test_sparsity_report_counts_zeros_of_effective_weights():
    model = _mlp()
    prune.apply_mask(model[0], "weight", prune.magnitude_mask(model[0].weight, 0.25))
    with torch.no_grad():
        model[2].weight[0, :5] = 0
    rows = prune.sparsity_report(model)
    assert [r["name"] for r in rows] == ["0", "2", "total"]
    assert (rows[0]["zeros"], rows[1]["zeros"], rows[2]["zeros"]) == (24, 5, 29)
    assert rows[2]["params"] == 96 + 48 and rows[2]["sparsity"] == pytest.approx(29 / 144)


def test_sensitivity_scan_prunes_one_layer_at_a_time_and_restores():
    model = _mlp()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    before = copy.deepcopy(model.state_dict())

    def evaluate(m):
        with torch.no_grad():
            return float(m(x).square().mean())

    scan = prune.sensitivity_scan(model, ["0", "2"], [0.0, 0.5, 0.9], evaluate)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    for name, index in (("0", 0), ("2", 2)):
        for s, got in zip([0.0, 0.5, 0.9], scan[name]):
            reference = copy.deepcopy(model)
            torch_prune.l1_unstructured(reference[index], "weight", amount=s)
            assert got == pytest.approx(evaluate(reference), rel=1e-6)
    assert scan["0"][0] == pytest.approx(evaluate(model))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("sparsity, error, match", [(1.0, ValueError, r"sparsity must be in \[0, 1\)"),
                                                    (-0.1, ValueError, "sparsity must be in"),
                                                    (float("nan"), ValueError, "nan"),
                                                    (True, TypeError, "sparsity must be a real number"),
                                                    ("0.5", TypeError, "real number")])
def test_bad_sparsity_is_refused(sparsity, error, match):
    with pytest.raises(error, match=match):
        prune.magnitude_mask(torch.ones(4), sparsity)
    with pytest.raises(error, match=match):
        prune.global_magnitude_masks({"a": torch.ones(4)}, sparsity)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        prune.magnitude_mask([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match="floating-point"):
        prune.magnitude_mask(torch.ones(4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="finite"):
        prune.magnitude_mask(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="n must be <= m"):
        prune.nm_mask(torch.ones(2, 4), 5, 4)
    with pytest.raises(ValueError, match="multiple of m=4"):
        prune.nm_mask(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError, match="named_weights is empty"):
        prune.global_magnitude_masks({}, 0.5)
    with pytest.raises(ValueError, match="unknown module name 'fc9'"):
        prune.sparsity_report(_mlp(), ["fc9"])
    with pytest.raises(ValueError, match="unknown module name"):
        prune.sensitivity_scan(_mlp(), ["nope"], [0.5], lambda m: 0.0)
    with pytest.raises(ValueError, match="mask shape"):
        prune.apply_mask(nn.Linear(3, 2), "weight", torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no parameter 'kernel'"):
        prune.apply_mask(nn.Linear(3, 2), "kernel", torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="is not pruned"):
        prune.remove(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="initial sparsity must be <= final"):
        prune.cubic_sparsity(0, 0.6, 0.5)
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        prune.cubic_sparsity(0, 0.0, 0.5, 0, 0)


# --------------------------------------------------------------------------- properties


SHAPES = st.lists(st.integers(1, 7), min_size=1, max_size=3)


@given(shape=SHAPES, sparsity=st.floats(0.0, 0.999), seed=st.integers(0, 2**31))
def test_property_magnitude_mask_zero_count_and_idempotence(shape, sparsity, seed):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    mask = prune.magnitude_mask(weight, sparsity)
    assert int((~mask).sum()) == round(sparsity * weight.numel())
    assert torch.equal(prune.magnitude_mask(weight * mask, sparsity), mask)  # masking again changes nothing
    kept, pruned = weight.abs()[mask], weight.abs()[~mask]
    assert kept.numel() == 0 or pruned.numel() == 0 or pruned.max() <= kept.min()


@given(rows=st.integers(1, 4), groups=st.integers(1, 4), nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8)]),
       seed=st.integers(0, 2**31))
def test_property_nm_mask_count_and_idempotence(rows, groups, nm, seed):
    n, m = nm
    scores = torch.rand(rows, groups * m, generator=torch.Generator().manual_seed(seed))
    mask = prune.nm_mask(scores, n, m)
    assert (mask.view(rows, groups, m).sum(-1) == n).all()
    assert torch.equal(prune.nm_mask(scores * mask, n, m), mask)


@given(st.lists(st.integers(-3, 3), min_size=1, max_size=200), st.data())
def test_lowest_mask_is_a_stable_sorts_first_k_even_with_many_ties(values, data):
    # lowest_mask finds the k-th value in O(n) instead of sorting; the reference is the stable sort it replaces
    scores = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(0, len(values)))
    reference = torch.ones(len(values), dtype=torch.bool)
    reference[torch.argsort(scores, stable=True)[:k]] = False
    assert torch.equal(prune.lowest_mask(scores, k), reference)
