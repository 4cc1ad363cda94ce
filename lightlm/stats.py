"""Statistics for comparing classifiers on one shared test set (chapter 7, "Distilling a classifier").

Two students scored on the same test sentences are *paired*: most sentences are easy or hard for both, so the
difference of their accuracies varies far less than each accuracy does. The tools here use that pairing:

* :func:`accuracy_standard_error`: the standard error of one accuracy, sqrt(p(1 - p) / n);
* :func:`paired_bootstrap`: a percentile interval for the difference of two accuracies (or of any per-item
  scores), resampling the test items with replacement (Efron and Tibshirani, 1993);
* :func:`mcnemar`: McNemar's test, exact and mid-p, from the discordant items only (McNemar, 1947;
  Fagerland, Lydersen and Laake, 2013);
* :func:`retention`: a student's score as a fraction of its teacher's, or of the teacher's margin over chance.

Measurement layer: pure torch, no model is run. Inputs stay on their device; results are Python floats.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ._checks import check_int, check_real, check_tensor

__all__ = ["BootstrapResult", "McNemarResult", "accuracy_standard_error", "paired_bootstrap", "mcnemar",
           "retention"]


class BootstrapResult(NamedTuple):
    """``difference`` = mean(a) − mean(b) on the test set; [``low``, ``high``] its percentile interval;
    ``standard_error`` the standard deviation of the bootstrap differences."""

    difference: float
    low: float
    high: float
    standard_error: float


class McNemarResult(NamedTuple):
    """``a_only`` items only A gets right (b in the usual notation), ``b_only`` items only B gets right (c);
    two-sided ``p_value`` (exact) and ``mid_p_value``."""

    a_only: int
    b_only: int
    p_value: float
    mid_p_value: float


def _scores(name: str, value: Any, allow_runs: bool) -> torch.Tensor:
    """Per-item scores, float64 (n,): a 0/1 correctness vector, bool or integer, or (with ``allow_runs``)
    real-valued scores, optionally (runs, n) and then averaged over the runs."""
    value = check_tensor(name, value, ndim=(1, 2) if allow_runs else 1)
    if value.dtype.is_complex:
        raise TypeError(f"{name} must be real-valued (bool, integer or float), got {value.dtype}")
    if not allow_runs and value.is_floating_point():
        raise TypeError(f"{name} must be a bool or integer 0/1 correctness vector, got {value.dtype}")
    if value.shape[-1] == 0 or value.numel() == 0:
        raise ValueError(f"{name} must score at least one item, got shape {tuple(value.shape)}")
    value = value.to(torch.float64)
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} must be finite")
    if not allow_runs and not ((value == 0) | (value == 1)).all():
        raise ValueError(f"{name} must hold only 0 (wrong) and 1 (right)")
    return value.mean(0) if value.ndim == 2 else value


def _pair(a: Any, b: Any, allow_runs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _scores("a", a, allow_runs), _scores("b", b, allow_runs)
    if a.shape != b.shape:
        raise ValueError(f"a and b must score the same test items, got {a.shape[0]} and {b.shape[0]} items")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    return a, b


def accuracy_standard_error(correct: torch.Tensor) -> float:
    """Standard error of an accuracy p on n independent test items: sqrt(p (1 − p) / n).

    ``correct``: (n,) bool or 0/1 integer tensor, one entry per test item. For p = 0.75 and n = 1,275 it is
    0.012, so on such a test set two accuracies 1 point apart are within one standard error of each other.
    """
    correct = _scores("correct", correct, allow_runs=False)
    p = correct.mean().item()
    return math.sqrt(p * (1.0 - p) / correct.numel())


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, *, samples: int = 10_000, confidence: float = 0.95,
                     seed: int = 0, chunk: int = 1_000) -> BootstrapResult:
    """Paired bootstrap of mean(a) − mean(b) over the same n test items.

    Each bootstrap sample draws n item indices with replacement and takes the difference of the two means
    over the *same* drawn items, so what is easy for both cancels. The interval is the percentile interval,
    the (1 − confidence)/2 and (1 + confidence)/2 quantiles of the ``samples`` differences.

    Args:
        a, b: per-item scores, (n,) or (runs, n): bool/0-1 correctness or real scores; a 2-D input (several
            seeds of one method) is averaged over its runs first, so the result is about the seed-mean.
        samples: number of bootstrap samples (>= 100). seed: seeds the resampling (a generator on the
            inputs' device). chunk: samples drawn at once (memory is chunk × n indices).
    """
    a, b = _pair(a, b, allow_runs=True)
    samples = check_int("samples", samples, min=100)
    confidence = check_real("confidence", confidence, min=0.0, max=1.0, min_open=True, max_open=True)
    seed = check_int("seed", seed, min=0, max=2**63 - 1)
    chunk = check_int("chunk", chunk, min=1)
    difference = a - b  # d_i, per item
    n = difference.numel()
    generator = torch.Generator(device=difference.device).manual_seed(seed)
    means = []
    for start in range(0, samples, chunk):
        size = min(chunk, samples - start)
        index = torch.randint(n, (size, n), generator=generator, device=difference.device)
        means.append(difference[index].mean(1))  # mean of d over one resample
    means = torch.cat(means)
    tails = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64,
                         device=difference.device)
    low, high = torch.quantile(means, tails).tolist()
    return BootstrapResult(difference.mean().item(), low, high, means.std().item())


def _log_binomial_pmf(k: torch.Tensor, n: int) -> torch.Tensor:
    """log P(X = k) for X ~ Binomial(n, 1/2), float64: log C(n, k) − n log 2."""
    n_ = torch.tensor(float(n), dtype=torch.float64, device=k.device)
    return torch.lgamma(n_ + 1) - torch.lgamma(k + 1) - torch.lgamma(n_ - k + 1) - n * math.log(2.0)


def mcnemar(a: torch.Tensor, b: torch.Tensor) -> McNemarResult:
    """McNemar's test of equal accuracy for two classifiers on the same n items (exact and mid-p).

    Only the discordant items count: A right and B wrong (``a_only``), A wrong and B right (``b_only``).
    Under equal accuracy each discordant item is a fair coin, so with m = a_only + b_only and
    k = min(a_only, b_only), the exact two-sided p-value is min(1, 2 P(X <= k)) for X ~ Binomial(m, 1/2),
    and the mid-p value, which counts the observed outcome only half, is 2 P(X <= k) − P(X = k), less
    conservative and close to nominal (Fagerland et al., 2013). With no discordant item both are 1.

    ``a``, ``b``: (n,) bool or 0/1 integer correctness of the two classifiers on the same items.
    """
    a, b = _pair(a, b, allow_runs=False)
    a_only, b_only = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    m, k = a_only + b_only, min(a_only, b_only)
    if m == 0:
        return McNemarResult(a_only, b_only, 1.0, 1.0)
    outcomes = torch.arange(k + 1, dtype=torch.float64, device=a.device)
    log_pmf = _log_binomial_pmf(outcomes, m)
    tail = torch.logsumexp(log_pmf, 0).exp().item()  # P(X <= k)
    at_k = log_pmf[-1].exp().item()  # P(X = k)
    return McNemarResult(a_only, b_only, min(1.0, 2 * tail), min(1.0, 2 * tail - at_k))


def retention(student: float, teacher: float, chance: float = 0.0) -> float:
    """The fraction of the teacher's score a student keeps, measured above ``chance``.

    (student − chance) / (teacher − chance). With ``chance=0`` it is the usual "% of teacher"; with the
    chance level (0.5 on a balanced binary task) it is the fraction of the teacher's margin over chance
    that the student keeps, which is 0 for a coin and 1 for a student as good as the teacher.

    Args:
        student, teacher, chance: accuracies (or other scores) in [0, 1]; teacher must exceed chance.
    """
    student = check_real("student", student, min=0.0, max=1.0)
    teacher = check_real("teacher", teacher, min=0.0, max=1.0)
    chance = check_real("chance", chance, min=0.0, max=1.0)
    if teacher <= chance:
        raise ValueError(f"teacher ({teacher}) must be above chance ({chance}) for a retention to mean anything")
    return (student - chance) / (teacher - chance)
