"""lightlm.stats against independent references: exact rational arithmetic (McNemar as scipy.stats.binomtest
defines its two-sided p-value), the closed-form variance of the ideal bootstrap, the exact bootstrap
distribution enumerated over every resample of a small test set, numpy, and hand-worked values."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightlm import stats


def _correct(n, p, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=generator) < p


def _binomtest_two_sided(k, m):
    """Two-sided exact binomial test of k successes in m trials at 1/2, in exact rationals, as
    scipy.stats.binomtest defines it: the total probability of every outcome no more likely than k."""
    pmf = [Fraction(math.comb(m, j), 2**m) for j in range(m + 1)]
    return min(Fraction(1), sum(q for q in pmf if q <= pmf[k]))


# --------------------------------------------------------------------------- standard error


def test_accuracy_standard_error_is_the_population_std_over_root_n():
    correct = _correct(1275, 0.74, seed=1)
    as_numpy = correct.numpy().astype(float)
    expected = as_numpy.std() / math.sqrt(len(as_numpy))  # numpy: std with ddof=0
    assert stats.accuracy_standard_error(correct) == pytest.approx(expected, rel=1e-12)
    # the docstring's example: p = 0.75 on 1,275 items
    correct = torch.arange(1275) % 4 != 0
    assert correct.float().mean().item() == pytest.approx(0.75, abs=1e-3)
    assert stats.accuracy_standard_error(correct) == pytest.approx(0.0121, abs=1e-4)


def test_accuracy_standard_error_takes_integer_zero_one_vectors():
    assert stats.accuracy_standard_error(torch.tensor([1, 0, 1, 1])) == pytest.approx(math.sqrt(0.75 * 0.25 / 4))


# --------------------------------------------------------------------------- McNemar


def test_mcnemar_matches_a_hand_worked_case():
    # 3 items only A gets right, 7 only B: P(X <= 3) = (1 + 10 + 45 + 120) / 1024 = 176 / 1024, P(X = 3) = 120/1024
    a = torch.tensor([1] * 3 + [0] * 7 + [1] * 20 + [0] * 5)
    b = torch.tensor([0] * 3 + [1] * 7 + [1] * 20 + [0] * 5)
    result = stats.mcnemar(a, b)
    assert (result.a_only, result.b_only) == (3, 7)
    assert result.p_value == pytest.approx(352 / 1024, rel=1e-12)  # scipy.stats.binomtest(3, 10).pvalue
    assert result.mid_p_value == pytest.approx(232 / 1024, rel=1e-12)


@pytest.mark.parametrize("a_only, b_only", [(0, 1), (0, 9), (5, 5), (12, 40), (730, 770), (60, 1440)])
def test_mcnemar_p_value_equals_the_exact_binomial_test_in_rationals(a_only, b_only):
    a = torch.tensor([1] * a_only + [0] * b_only + [1, 0])
    b = torch.tensor([0] * a_only + [1] * b_only + [1, 0])
    result = stats.mcnemar(a, b)
    k, m = min(a_only, b_only), a_only + b_only
    exact = _binomtest_two_sided(k, m)
    mid = min(Fraction(1), exact - Fraction(math.comb(m, k), 2**m)) if a_only != b_only else Fraction(1)
    assert result.p_value == pytest.approx(float(exact), rel=1e-9, abs=1e-300)
    assert result.mid_p_value == pytest.approx(float(mid), rel=1e-9, abs=1e-300)


def test_mcnemar_without_discordant_items_is_one():
    a = torch.tensor([True, False, True])
    assert stats.mcnemar(a, a) == (0, 0, 1.0, 1.0)


# --------------------------------------------------------------------------- paired bootstrap


def test_paired_bootstrap_standard_error_matches_the_ideal_bootstrap_closed_form():
    a, b = _correct(1275, 0.74, seed=2), _correct(1275, 0.72, seed=3)
    result = stats.paired_bootstrap(a, b, samples=40_000, seed=0)
    d = a.double().numpy() - b.double().numpy()
    ideal = math.sqrt(((d - d.mean()) ** 2).mean() / len(d))  # sd of the mean of n draws from d's empirical law
    assert result.difference == pytest.approx(d.mean(), rel=1e-12)
    assert result.standard_error == pytest.approx(ideal, rel=0.02)
    assert result.low < d.mean() < result.high
    # a 95% interval of a near-normal mean: about ±1.96 standard errors
    assert result.high - result.low == pytest.approx(2 * 1.96 * ideal, rel=0.05)


def test_paired_bootstrap_interval_matches_the_enumerated_bootstrap_distribution():
    """n = 6 real scores: every one of the 6**6 resamples enumerated gives the exact bootstrap law."""
    d = np.array([0.3, -1.2, 0.7, 2.5, -0.4, 1.1])
    means = np.array([d[list(index)].mean() for index in itertools.product(range(6), repeat=6)])
    result = stats.paired_bootstrap(torch.tensor(d), torch.zeros(6, dtype=torch.float64), samples=100_000,
                                    confidence=0.9, seed=1)
    # the ends are the 5% and 95% quantiles of the exact (discrete) law: P(X < low) <= 0.05 <= P(X <= low),
    # and the same above the upper end, up to Monte Carlo error (sd about 0.0007)
    tolerance = 0.003
    assert (means < result.low).mean() <= 0.05 + tolerance <= (means <= result.low).mean() + 2 * tolerance
    assert (means > result.high).mean() <= 0.05 + tolerance <= (means >= result.high).mean() + 2 * tolerance
    assert result.standard_error == pytest.approx(means.std(), rel=0.01)


def test_paired_bootstrap_of_identical_scores_is_exactly_zero():
    a = _correct(200, 0.7, seed=4)
    assert stats.paired_bootstrap(a, a, samples=200) == (0.0, 0.0, 0.0, 0.0)


def test_paired_bootstrap_averages_runs_before_resampling():
    runs_a = torch.stack([_correct(300, 0.7, seed=s) for s in range(3)])  # (runs, n)
    runs_b = torch.stack([_correct(300, 0.6, seed=10 + s) for s in range(2)])
    result = stats.paired_bootstrap(runs_a, runs_b, samples=500, seed=5)
    expected = runs_a.double().mean().item() - runs_b.double().mean().item()
    assert result.difference == pytest.approx(expected, rel=1e-12)
    assert result == stats.paired_bootstrap(runs_a.double().mean(0), runs_b.double().mean(0), samples=500, seed=5)


# --------------------------------------------------------------------------- retention


def test_retention_of_teacher_and_of_the_teacher_margin_over_chance():
    assert stats.retention(0.737, 0.807) == pytest.approx(0.737 / 0.807)
    assert stats.retention(0.737, 0.807, chance=0.5) == pytest.approx(0.237 / 0.307)
    assert stats.retention(0.5, 0.807, chance=0.5) == 0.0  # a coin keeps nothing of the margin
    assert stats.retention(0.807, 0.807, chance=0.5) == 1.0


# --------------------------------------------------------------------------- properties


@settings(max_examples=40)
@given(n=st.integers(1, 120), p_a=st.floats(0, 1), p_b=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_mcnemar_is_symmetric_bounded_and_exact_for_any_pair(n, p_a, p_b, seed):
    a, b = _correct(n, p_a, seed), _correct(n, p_b, seed + 1)
    forward, backward = stats.mcnemar(a, b), stats.mcnemar(b, a)
    assert (forward.a_only, forward.b_only) == (backward.b_only, backward.a_only)
    assert forward.p_value == backward.p_value and forward.mid_p_value == backward.mid_p_value
    assert 0.0 < forward.mid_p_value <= forward.p_value <= 1.0
    m = forward.a_only + forward.b_only
    if m:
        exact = _binomtest_two_sided(min(forward.a_only, forward.b_only), m)
        assert forward.p_value == pytest.approx(float(exact), rel=1e-9)


@settings(max_examples=25)
@given(n=st.integers(2, 80), seed=st.integers(0, 2**31), confidence=st.floats(0.5, 0.99))
def test_paired_bootstrap_swapping_the_pair_mirrors_the_interval(n, seed, confidence):
    a, b = _correct(n, 0.7, seed), _correct(n, 0.6, seed + 1)
    forward = stats.paired_bootstrap(a, b, samples=300, confidence=confidence, seed=seed)
    backward = stats.paired_bootstrap(b, a, samples=300, confidence=confidence, seed=seed)
    assert backward.difference == pytest.approx(-forward.difference, abs=1e-12)
    assert backward.low == pytest.approx(-forward.high, abs=1e-12)
    assert backward.high == pytest.approx(-forward.low, abs=1e-12)
    assert forward.low <= forward.difference + 1e-12 or forward.high >= forward.difference - 1e-12
    assert -1.0 <= forward.low <= forward.high <= 1.0


# --------------------------------------------------------------------------- bad input


GOOD = torch.tensor([True, False, True, True])


@pytest.mark.parametrize("call, error, match", [
    (lambda: stats.mcnemar([1, 0, 1, 1], GOOD), TypeError, "a must be a torch.Tensor"),
    (lambda: stats.mcnemar(GOOD.float(), GOOD), TypeError, "bool or integer 0/1"),
    (lambda: stats.mcnemar(torch.tensor([0, 1, 2, 1]), GOOD), ValueError, "only 0 .wrong. and 1 .right."),
    (lambda: stats.mcnemar(GOOD, GOOD[:3]), ValueError, "same test items, got 4 and 3"),
    (lambda: stats.mcnemar(GOOD[None], GOOD), ValueError, "must be 1-D"),
    (lambda: stats.accuracy_standard_error(torch.tensor([], dtype=torch.bool)), ValueError, "at least one item"),
    (lambda: stats.paired_bootstrap(GOOD[None, None], GOOD), ValueError, "1-D or 2-D"),
    (lambda: stats.paired_bootstrap(torch.tensor([0.5, float("nan")]), torch.zeros(2)), ValueError, "finite"),
    (lambda: stats.paired_bootstrap(GOOD, GOOD, samples=10), ValueError, "samples must be >= 100"),
    (lambda: stats.paired_bootstrap(GOOD, GOOD, confidence=1.0), ValueError, r"confidence must be in \(0"),
    (lambda: stats.paired_bootstrap(GOOD, GOOD, seed=-1), ValueError, "seed must be in"),
    (lambda: stats.paired_bootstrap(GOOD, GOOD, samples=1e4), TypeError, "samples must be an int"),
    (lambda: stats.retention(0.7, 0.5, chance=0.5), ValueError, r"teacher \(0.5\) must be above chance"),
    (lambda: stats.retention(1.5, 0.8), ValueError, r"student must be in \[0.0, 1.0\]"),
    (lambda: stats.retention(True, 0.8), TypeError, "student must be a real number"),
])
def test_bad_input_is_refused_with_a_message(call, error, match):
    with pytest.raises(error, match=match):
        call()
