"""lightlm.exercises.check("rank_for_energy", ...): accepts an implementation written independently of the library
(numpy) and names the usual slips, each with its own case."""

import numpy as np
import pytest
import torch

from lightlm import exercises


def numpy_rank(singular_values, energy):
    squares = np.sort(singular_values.numpy().astype(np.float64))[::-1] ** 2
    cumulative = np.cumsum(squares)
    return int(np.searchsorted(cumulative, energy * cumulative[-1], side="left")) + 1


def test_an_independent_rank_for_energy_passes():
    assert exercises.check("rank_for_energy", numpy_rank) is None
    assert "rank_for_energy" in exercises.names()


def _cumulative(s, squared=True):
    return (s.square() if squared else s).cumsum(0)


@pytest.mark.parametrize("wrong, case", [
    (lambda s, e: int((_cumulative(s) < e * _cumulative(s)[-1]).sum()), "starting at 1"),
    (lambda s, e: int((_cumulative(s, False) < e * _cumulative(s, False)[-1]).sum()) + 1, "squared singular"),
    (lambda s, e: int((_cumulative(s) <= e * _cumulative(s)[-1]).sum()) + 1, "boundary"),
    (lambda s, e: len(s) if e == 1 else numpy_rank(s, e), "not the zeros"),
    (lambda s, e: float(numpy_rank(s, e)), "expected rank"),
    (lambda s, e: [][0], "raised IndexError"),
])
def test_the_usual_slips_are_named(wrong, case):
    with pytest.raises(AssertionError, match=case):
        exercises.check("rank_for_energy", wrong)
