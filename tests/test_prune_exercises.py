"""lightlm.exercises.check: accepts correct implementations written independently of the library (numpy), and
rejects the plausible wrong ones, naming the case that caught them."""

import math

import numpy as np
import pytest
import torch

from lightlm import exercises, prune, prune_calib

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


# --------------------------------------------------------------------------- magnitude_mask


def numpy_magnitude_mask(weight, sparsity):
    """A reader's correct version, in numpy: stable argsort of |w|, round(s·n) pruned."""
    flat = np.abs(weight.numpy()).ravel()
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:round(sparsity * flat.size)]] = False
    return torch.from_numpy(keep.reshape(weight.shape))


def floor_count(weight, sparsity):
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    keep[torch.argsort(weight.abs().flatten(), stable=True)[:math.floor(sparsity * weight.numel())]] = False
    return keep.view(weight.shape)


def half_up_count(weight, sparsity):
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    keep[torch.argsort(weight.abs().flatten(), stable=True)[:int(sparsity * weight.numel() + 0.5)]] = False
    return keep.view(weight.shape)


def threshold_ties(weight, sparsity):
    """Prunes every |w| at or below the k-th smallest: more than k zeros when there are ties."""
    k = round(sparsity * weight.numel())
    if k == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    return weight.abs() > weight.abs().flatten().sort().values[k - 1]


def last_index_ties(weight, sparsity):
    """Right count, but ties go to the HIGHER index (a descending stable sort reversed)."""
    k = round(sparsity * weight.numel())
    order = torch.argsort(-weight.abs().flatten(), stable=True).flip(0)[:k]
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    keep[order] = False
    return keep.view(weight.shape)


def signed(weight, sparsity):
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    keep[torch.argsort(weight.flatten(), stable=True)[:round(sparsity * weight.numel())]] = False
    return keep.view(weight.shape)


def per_row(weight, sparsity):
    return prune.row_mask(weight.abs().reshape(-1, weight.shape[-1]), sparsity).view(weight.shape)


def in_place(weight, sparsity):
    mask = numpy_magnitude_mask(weight, sparsity)
    weight.mul_(mask)
    return mask


def test_magnitude_mask_checker_accepts_correct_versions():
    assert exercises.check("magnitude_mask", prune.magnitude_mask) is None
    exercises.check("magnitude_mask", numpy_magnitude_mask)
    exercises.check("magnitude_mask", lambda w, s: numpy_magnitude_mask(w, s).float())  # 1/0 masks are fine


@pytest.mark.parametrize("wrong, match", [
    (floor_count, "case 'round, not floor: 0.37 of 10 weights prunes round\\(3.7\\) = 4': expected 4 pruned"),
    (half_up_count, "Python's round is half to even"),
    (threshold_ties, "case 'ties: exactly round\\(s·n\\) pruned, the lower flat index first': expected 2 pruned"),
    (last_index_ties, "ties: .*the right number pruned, but not the right ones"),
    (signed, "case 'negative weights count by magnitude"),
    (per_row, "case 'per tensor, not per row"),
    (in_place, "modified its input tensor"),
    (lambda w, s: w.abs() > 0.5, "expected"),
    (lambda w, s: [True], "expected a bool tensor, got list"),
    (lambda w: w, "raised TypeError"),
])
def test_magnitude_mask_checker_rejects_plausible_wrong_versions(wrong, match):
    with pytest.raises(AssertionError, match=match):
        exercises.check("magnitude_mask", wrong)


# --------------------------------------------------------------------------- wanda_mask


def numpy_wanda_mask(weight, inputs, sparsity):
    x = inputs.numpy().reshape(-1, inputs.shape[-1])
    scores = np.abs(weight.numpy()) * np.sqrt((x ** 2).sum(0))
    keep = np.ones(scores.shape, dtype=bool)
    for i, row in enumerate(scores):
        keep[i, np.argsort(row, kind="stable")[:round(sparsity * row.size)]] = False
    return torch.from_numpy(keep)


def test_wanda_checker_accepts_correct_versions_and_rejects_wrong_ones():
    exercises.check("wanda_mask", numpy_wanda_mask)
    exercises.check("wanda_mask", prune_calib.wanda_mask)
    wrong = {
        "per row, not per tensor": lambda w, x, s: prune.magnitude_mask(prune_calib.wanda_scores(w, x), s),
        "the input norm": lambda w, x, s: prune.row_mask(w.abs(), s),
        "round, not floor": lambda w, x, s: numpy_wanda_mask(w, x, math.floor(s * w.shape[1]) / w.shape[1]),
        "flattened over batch and seq": lambda w, x, s: prune.row_mask(w.abs() * x.norm(dim=0), s),  # 3-D breaks
    }
    for case, fn in wrong.items():
        with pytest.raises(AssertionError, match=case):
            exercises.check("wanda_mask", fn)


# --------------------------------------------------------------------------- nm_mask and the checker itself


def test_nm_checker_rejects_groups_down_the_columns_and_unstable_ties():
    exercises.check("nm_mask", prune.nm_mask)
    with pytest.raises(AssertionError, match="case '2:4 on random"):
        exercises.check("nm_mask", lambda s, n, m: prune.nm_mask(s.T.contiguous(), n, m).T)
    with pytest.raises(AssertionError, match="ties inside a group"):
        exercises.check("nm_mask", lambda s, n, m: prune.nm_mask(s.flip(-1), n, m).flip(-1))
    with pytest.raises(AssertionError, match="1:4 keeps one in four"):
        exercises.check("nm_mask", lambda s, n, m: prune.nm_mask(s, m - n, m))  # n taken as the number pruned


def test_check_refuses_unknown_names_and_non_callables():
    assert {"magnitude_mask", "wanda_mask", "nm_mask"} <= set(exercises.names())
    with pytest.raises(ValueError, match="unknown exercise 'magnitude'; known: .*magnitude_mask"):
        exercises.check("magnitude", prune.magnitude_mask)
    with pytest.raises(TypeError, match="fn must be callable"):
        exercises.check("magnitude_mask", 3)
    with pytest.raises(TypeError, match="name must be a str"):
        exercises.check(None, prune.magnitude_mask)
