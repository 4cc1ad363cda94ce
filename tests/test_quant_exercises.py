"""lightlm.exercises.check("affine_quantize", ...): accepts an affine quantizer written independently of the library
(numpy, float32 arithmetic as MinMaxObserver does it) and rejects the usual slips, each with its own case."""

import numpy as np
import pytest
import torch

from lightlm import exercises


def numpy_affine(x, bits):
    values = x.numpy().astype(np.float32)
    qmax = 2**bits - 1
    low, high = np.float32(min(values.min(), 0)), np.float32(max(values.max(), 0))
    scale = np.float32((high - low) / np.float32(qmax))
    zero = -np.round(low / scale)
    inverse = np.float32(1) / scale
    return torch.from_numpy(np.clip(np.round(values * inverse) + zero, 0, qmax).astype(np.int64))


def test_an_independent_affine_quantizer_passes():
    assert exercises.check("affine_quantize", numpy_affine) is None
    assert "affine_quantize" in exercises.names()


def floor_no_zero_point(x, bits):  # article 003
    low, high = x.min(), x.max()
    return torch.floor((x - low) / (high - low) * (2**bits - 1))


def unwidened(x, bits):
    low, high = x.min(), x.max()
    return torch.clamp(torch.round((x - low) / ((high - low) / (2**bits - 1))), 0, 2**bits - 1)


def fractional_zero_point(x, bits):  # widened, but z not rounded: 0 is off the grid
    low, high = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = (high - low) / (2**bits - 1)
    return torch.clamp(torch.round(x / scale - low / scale), 0, 2**bits - 1)


def signed_range(x, bits):
    return numpy_affine(x, bits) - 2 ** (bits - 1)


@pytest.mark.parametrize("wrong, case", [
    (floor_no_zero_point, "round, not floor"),
    (unwidened, "widened to include 0"),
    (fractional_zero_point, "an integer zero point"),
    (signed_range, "round, not floor"),
    (lambda x, bits: numpy_affine(x, bits)[:-1], "expected a tensor of shape"),
    (lambda x, bits: 1 / 0, "raised ZeroDivisionError"),
])
def test_the_usual_slips_are_named(wrong, case):
    with pytest.raises(AssertionError, match=case):
        exercises.check("affine_quantize", wrong)
