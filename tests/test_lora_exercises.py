"""lightlm.exercises.check("lora_forward", ...): accepts LoRA's forward written independently (numpy, the unmerged
two-step form) and names the usual slips, each with its own case."""

import numpy as np
import pytest
import torch

from lightlm import exercises


def numpy_lora(x, weight, bias, lora_a, lora_b, scaling):
    x_, w = x.numpy(), weight.numpy()
    out = x_ @ w.T + (0 if bias is None else bias.numpy()) + scaling * (x_ @ lora_a.numpy().T) @ lora_b.numpy().T
    return torch.from_numpy(np.ascontiguousarray(out))


def test_an_independent_lora_forward_passes():
    assert exercises.check("lora_forward", numpy_lora) is None
    assert "lora_forward" in exercises.names()


def _bias(bias):
    return 0 if bias is None else bias


@pytest.mark.parametrize("wrong, case", [
    (lambda x, w, b, a, bb, s: x @ w.T + _bias(b) + (x @ a.T) @ bb.T, "scaled by alpha"),           # no scaling
    (lambda x, w, b, a, bb, s: x @ w.T + b + s * (x @ a.T) @ bb.T, "raised TypeError"),           # bias None
    (lambda x, w, b, a, bb, s: x @ w.T + _bias(b) + s * (x @ bb) @ a, "raised RuntimeError"),    # A, B swapped
    (lambda x, w, b, a, bb, s: x @ w.T + _bias(b) + s * x @ (a.T @ bb.T) + 1e-6, "largest difference"),
    (lambda x, w, b, a, bb, s: (x @ w.T + _bias(b) + s * (x @ a.T) @ bb.T).tolist(), "expected a tensor"),
    (lambda x, w, b, a, bb, s: (w.add_(s * bb @ a), x @ w.T + _bias(b))[1], "modified its input"),  # merges in place
])
def test_the_usual_slips_are_named(wrong, case):
    with pytest.raises(AssertionError, match=case):
        exercises.check("lora_forward", wrong)


def test_the_reference_is_not_the_function_itself():
    """The checker's reference (merged weight) equals the two-step form on a case computed here by hand."""
    x, w, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0.5, -0.5])
    a, bb = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0], [0.0]])
    # x Wᵀ + b = [1.5, 1.5]; x Aᵀ = [3]; · Bᵀ = [6, 0]; scaled by 0.5: [3, 0]
    assert numpy_lora(x, w, b, a, bb, 0.5).tolist() == [[4.5, 1.5]]
