"""lightlm.exercises.check("pack_int4", ...): accepts a packer written independently (NumPy bit operations) and
rejects the usual slips (high nibble first, int64 words, packing along the wrong axis)."""

import numpy as np
import pytest
import torch

from lightlm import exercises


def numpy_pack(codes: torch.Tensor) -> torch.Tensor:
    values = codes.numpy().astype(np.uint32)
    words = np.zeros((values.shape[0] // 8, values.shape[1]), dtype=np.uint32)
    for k in range(8):
        words |= values[k::8] << np.uint32(4 * k)
    return torch.from_numpy(words.view(np.int32).copy())


def test_an_independent_packer_passes():
    assert exercises.check("pack_int4", numpy_pack) is None
    assert "pack_int4" in exercises.names()


@pytest.mark.parametrize("wrong, message", [
    (lambda c: numpy_pack(c.reshape(-1, 8, c.shape[1]).flip(1).reshape(c.shape)), "lowest 4 bits"),  # high first
    (lambda c: numpy_pack(c).to(torch.int64), "int32"),
    (lambda c: numpy_pack(c.T.contiguous()), "expected an int32 tensor of shape"),  # the wrong axis
    (lambda c: 1 / 0, "raised ZeroDivisionError"),
])
def test_slips_are_caught(wrong, message):
    with pytest.raises(AssertionError, match=message):
        exercises.check("pack_int4", wrong)
