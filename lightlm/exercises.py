"""Checkers for the exercises where the reader writes a core function (from chapter 9 on).

``check(name, fn)`` runs the library's reference cases for ``name`` against the reader's ``fn`` (the most telling
cases first): it returns quietly (None) when every case passes and raises ``AssertionError`` naming the first
failing case and what was expected when one does not. The cases are chosen to catch the usual slips (for a pruning mask: ties, floor
instead of round, the sign of the weights, a per-tensor ranking where a per-row one is asked for).

Chapters add their own names with the :func:`exercise` decorator. Available: see :func:`names`.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._checks import check_callable
from .prune import magnitude_mask, nm_mask
from .prune_calib import wanda_mask
from .quant import qparams, quantize
from .quant_gptq import _pack_int32

__all__ = ["check", "names", "exercise"]

_CHECKERS: dict[str, Callable[[Callable], None]] = {}


def exercise(name: str):
    """Register a checker: ``@exercise("magnitude_mask") def _(fn): ...`` (the checker calls :func:`_case`)."""
    def register(checker: Callable[[Callable], None]):
        _CHECKERS[name] = checker
        return checker
    return register


def names() -> list[str]:
    """The exercise names :func:`check` knows."""
    return sorted(_CHECKERS)


def check(name: str, fn: Callable) -> None:
    """Test the reader's ``fn`` on the reference cases of exercise ``name``.

    Raises:
        AssertionError: naming the first case that fails (or that raised), with the expected answer.
        ValueError: ``name`` is not a known exercise; TypeError: ``fn`` is not callable.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in _CHECKERS:
        raise ValueError(f"unknown exercise {name!r}; known: {', '.join(names())}")
    check_callable("fn", fn)
    _CHECKERS[name](fn)


def _call(exercise_name: str, case: str, fn: Callable, args: tuple):
    """``fn(*args)`` on copies of the tensors, so a reader's in-place edit cannot spoil later cases; an exception
    becomes an AssertionError naming the case. Returns the result and the copies."""
    copies = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        return fn(*copies), copies
    except Exception as error:  # the reader's code: report which case broke it
        raise AssertionError(f"{exercise_name}: case '{case}' raised {type(error).__name__}: {error}") from error


def _case(exercise_name: str, case: str, fn: Callable, args: tuple, expected: torch.Tensor) -> None:
    """Run ``fn(*args)`` (on copies, so a reader's in-place edit cannot spoil later cases) against a keep-mask."""
    got, copies = _call(exercise_name, case, fn, args)
    for a, c in zip(args, copies):
        if isinstance(a, torch.Tensor) and not torch.equal(a, c):
            raise AssertionError(f"{exercise_name}: case '{case}': the function modified its input tensor")
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{exercise_name}: case '{case}': expected a bool tensor, got {type(got).__name__}")
    if got.shape != expected.shape:
        raise AssertionError(f"{exercise_name}: case '{case}': expected shape {tuple(expected.shape)}, got "
                             f"{tuple(got.shape)}")
    if got.dtype != torch.bool:
        if not ((got == 0) | (got == 1)).all():
            raise AssertionError(f"{exercise_name}: case '{case}': a mask holds True/False (or 1/0), got other values")
        got = got != 0
    if int((~got).sum()) != int((~expected).sum()):
        raise AssertionError(f"{exercise_name}: case '{case}': expected {int((~expected).sum())} pruned entries "
                             f"(False), got {int((~got).sum())}")
    if not torch.equal(got, expected):
        raise AssertionError(f"{exercise_name}: case '{case}': the right number pruned, but not the right ones;\n"
                             f"expected (True = kept)\n{expected.int()}\ngot\n{got.int()}")


def _tie_free(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random weights with distinct magnitudes (a random permutation of 1..n, random signs, scaled)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (torch.randperm(n, generator=g).float().add(1) * signs / n).view(shape)


@exercise("magnitude_mask")
def _magnitude_mask(fn: Callable) -> None:
    """fn(weight, sparsity) -> bool keep-mask: round(s·n) smallest |w| pruned, ties to the lower flat index."""
    small_row = torch.tensor([[0.1, -0.2, 0.3, 0.4], [5.0, -6.0, 7.0, -8.0], [0.9, 1.0, -1.1, 1.2]])
    ties = torch.tensor([[1.0, 3.0, -1.0, 2.0], [1.0, -3.0, 1.0, 2.0]])
    cases = [
        ("negative weights count by magnitude |w|", (torch.tensor([[-9.0, 0.5, -0.1, 2.0]]), 0.5)),
        ("per tensor, not per row: one row holds all the small weights", (small_row, 4 / 12)),
        ("round, not floor: 0.37 of 10 weights prunes round(3.7) = 4", (_tie_free(2, 5, seed=1), 0.37)),
        ("Python's round is half to even: 0.5 of 5 weights prunes 2", (_tie_free(5, seed=2), 0.5)),
        ("ties: exactly round(s·n) pruned, the lower flat index first", (ties, 0.25)),
        ("sparsity 0 prunes nothing", (_tie_free(3, 3, seed=3), 0.0)),
        ("a 3-D tensor is ranked as a whole", (_tie_free(2, 3, 4, seed=4), 0.75)),
        ("random 6×8 weights at sparsity 0.5", (_tie_free(6, 8), 0.5)),
    ]
    for case, args in cases:
        _case("magnitude_mask", case, fn, args, magnitude_mask(*args))


@exercise("wanda_mask")
def _wanda_mask(fn: Callable) -> None:
    """fn(weight, inputs, sparsity) -> keep-mask: per output row, the round(s·in) lowest |W_ij|·‖X_j‖₂ pruned."""
    g = torch.Generator().manual_seed(5)
    weight, inputs = _tie_free(4, 6, seed=5), torch.randn(10, 6, generator=g)
    loud = inputs * torch.tensor([1.0, 30.0, 1.0, 1.0, 0.03, 1.0])  # feature 1 large, feature 4 tiny
    rows = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]])
    cases = [
        ("per row, not per tensor: every row keeps the same count", (rows, torch.ones(3, 4), 0.5)),
        ("the input norm ‖X_j‖ changes the ranking, not |W| alone", (weight, loud, 0.5)),
        ("inputs of shape (batch, seq, in) are flattened over batch and seq", (weight, inputs.view(2, 5, 6), 0.5)),
        ("round, not floor: 0.45 of 6 inputs prunes round(2.7) = 3 per row", (weight, loud, 0.45)),
        ("random 4×6 weights, 10 calibration tokens, sparsity 0.5", (weight, inputs, 0.5)),
    ]
    for case, args in cases:
        _case("wanda_mask", case, fn, args, wanda_mask(*args))


@exercise("nm_mask")
def _nm_mask(fn: Callable) -> None:
    """fn(scores, n, m) -> keep-mask: in each group of m along the last dim, the n highest kept (stable ties)."""
    cases = [
        ("2:4 on random 4×8 scores", (_tie_free(4, 8, seed=6).abs(), 2, 4)),
        ("groups run along the rows (inputs), not down the columns", (_tie_free(4, 4, seed=7).abs(), 2, 4)),
        ("1:4 keeps one in four", (_tie_free(2, 8, seed=8).abs(), 1, 4)),
        ("ties inside a group: the lower index is pruned first", (torch.ones(2, 4), 2, 4)),
    ]
    for case, args in cases:
        _case("nm_mask", case, fn, args, nm_mask(*args))


def _codes_case(exercise_name: str, case: str, fn: Callable, args: tuple, expected: torch.Tensor) -> None:
    """Run ``fn(*args)`` on copies against integer codes (any integer or whole-valued float dtype)."""
    got, _ = _call(exercise_name, case, fn, args)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise AssertionError(f"{exercise_name}: case '{case}': expected a tensor of shape {tuple(expected.shape)}, "
                             f"got {getattr(got, 'shape', type(got).__name__)}")
    if not torch.equal(got.to(torch.float64), expected.to(torch.float64)):
        wrong = int((got.to(torch.float64) != expected.to(torch.float64)).sum())
        raise AssertionError(f"{exercise_name}: case '{case}': {wrong} of {expected.numel()} codes differ;\n"
                             f"expected {expected.flatten()[:12].tolist()}\ngot      {got.flatten()[:12].tolist()}")


@exercise("affine_quantize")
def _affine_quantize(fn: Callable) -> None:
    """fn(x, bits) -> codes on [0, 2^b − 1], one scale and zero point per tensor, as MinMaxObserver chooses them."""
    g = torch.Generator().manual_seed(7)

    def uniform(n, low, high):
        return torch.rand(n, generator=g) * (high - low) + low

    from_zero = uniform(40, 0.0, 2.0)
    from_zero[0] = 0.0
    cases = [
        ("round, not floor: values in [0, 2], 8 bits", (from_zero, 8)),
        ("the range is widened to include 0: all values positive", (uniform(30, 0.5, 2.0), 4)),
        ("an integer zero point: values in [-1, 3]", (uniform(40, -1.0, 3.0), 8)),
        ("0 itself gets the code z, which decodes to exactly 0", (torch.tensor([-1.0, 0.0, 0.7, 3.0]), 4)),
        ("the range is widened to include 0: all values negative", (uniform(30, -2.0, -0.5), 3)),
        ("one scale for the whole 2-D tensor", (torch.randn(4, 9, generator=g), 4)),
        ("2 bits: four levels", (torch.randn(25, generator=g), 2)),
    ]
    for case, (x, bits) in cases:
        qmax = 2**bits - 1
        scale, zero_point = qparams(x.min(), x.max(), 0, qmax)
        _codes_case("affine_quantize", case, fn, (x, bits), quantize(x, scale, zero_point, 0, qmax))


@exercise("rank_for_energy")
def _rank_for_energy(fn: Callable) -> None:
    """fn(singular_values, energy) -> the smallest rank r with Σ_{i≤r} σ_i² ≥ energy · Σ σ_i² (an int)."""
    from .lowrank import rank_for_energy

    cases = [
        ("a rank counts values, starting at 1", (torch.tensor([4.0, 1.0, 1.0, 1.0]), 0.5)),
        ("energy counts squared singular values, not σ", (torch.tensor([3.0, 2.0, 1.0, 1.0]), 0.8)),
        ("exactly on the boundary, ≥: σ₁² = 4 is 0.25 of 16", (torch.tensor([2.0] + [1.0] * 12), 0.25)),
        ("energy 1 keeps every non-zero value, not the zeros", (torch.tensor([2.0, 1.0, 0.0, 0.0]), 1.0)),
        ("singular values of a real matrix", (torch.linalg.svdvals(_tie_free(12, 8, seed=9)), 0.9)),
    ]
    for case, args in cases:
        expected = rank_for_energy(*args)
        got, _ = _call("rank_for_energy", case, fn, args)
        got = int(got.item()) if isinstance(got, torch.Tensor) and got.numel() == 1 else got
        if isinstance(got, bool) or not isinstance(got, int) or got != expected:
            raise AssertionError(f"rank_for_energy: case '{case}': expected rank {expected}, got {got!r}")


@exercise("lora_forward")
def _lora_forward(fn: Callable) -> None:
    """fn(x, weight, bias, lora_A, lora_B, scaling) -> x W₀ᵀ + b + scaling · (x Aᵀ) Bᵀ (LoRA's forward, eq. lora).

    The reference is the merged layer, F.linear(x, W₀ + scaling · B A, b): another route to the same numbers."""
    g = torch.Generator().manual_seed(12)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    d_in, d_out, r = 6, 5, 2
    weight, bias, a, b = randn(d_out, d_in), randn(d_out), randn(r, d_in), randn(d_out, r)
    cases = [
        ("a batch of sequences (2, 3, d_in)", (randn(2, 3, d_in), weight, bias, a, b, 1.0)),
        ("the update is scaled by alpha / r", (randn(4, d_in), weight, bias, a, b, 0.25)),
        ("no bias (None)", (randn(4, d_in), weight, None, a, b, 2.0)),
        ("B = 0 at initialisation: the base layer's output", (randn(4, d_in), weight, bias, a, 0 * b, 2.0)),
        ("rank 1, a wide layer", (randn(3, 8), randn(12, 8), randn(12), randn(1, 8), randn(12, 1), 16.0)),
    ]
    for case, args in cases:
        x, w, bias_, a_, b_, scaling = args
        expected = torch.nn.functional.linear(x, w + scaling * b_ @ a_, bias_)
        got, copies = _call("lora_forward", case, fn, args)
        if any(isinstance(t, torch.Tensor) and not torch.equal(t, c) for t, c in zip(args, copies)):
            raise AssertionError(f"lora_forward: case '{case}': the function modified its input tensor")
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(f"lora_forward: case '{case}': expected a tensor of shape {tuple(expected.shape)}, "
                                 f"got {shape}")
        if not torch.allclose(got.double(), expected, rtol=1e-9, atol=1e-9):
            raise AssertionError(f"lora_forward: case '{case}': largest difference from x W₀ᵀ + b + s (x Aᵀ) Bᵀ is "
                                 f"{(got.double() - expected).abs().max().item():.3g}")


@exercise("head_scores")
def _head_scores(fn: Callable) -> None:
    """fn(value_weight, out_weight, n_heads) -> (n_heads,): ‖W_V^(h)‖_F · ‖W_O^(h)‖_F, head h's value rows
    h·d..(h+1)·d − 1 and output-projection columns the same (d = width / n_heads). The reference slices each
    head in a loop (:func:`lightlm.prune_structured.head_scores` reshapes instead)."""
    g = torch.Generator().manual_seed(13)
    cases = [("4 heads of 3 features, a square layer", 4, 12, 12), ("one head", 1, 6, 6),
             ("rows and columns differ: a 10-wide model with 2 heads of 4", 2, 10, 8),
             ("12 heads of 32, MiniLM's shape", 12, 384, 384)]
    for case, n_heads, width, inner in cases:
        value, out = torch.randn(inner, width, generator=g), torch.randn(width, inner, generator=g)
        out[:, :inner // n_heads] *= 3  # the first head writes more: a transposed slice gives other numbers
        d = inner // n_heads
        expected = torch.stack([value[h * d:(h + 1) * d].norm() * out[:, h * d:(h + 1) * d].norm()
                                for h in range(n_heads)])
        got, copies = _call("head_scores", case, fn, (value, out, n_heads))
        if not (torch.equal(value, copies[0]) and torch.equal(out, copies[1])):
            raise AssertionError(f"head_scores: case '{case}': the function modified its input tensor")
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise AssertionError(f"head_scores: case '{case}': expected a tensor of shape ({n_heads},), got {shape}")
        if not torch.allclose(got.float(), expected, rtol=1e-5, atol=1e-6):
            raise AssertionError(f"head_scores: case '{case}': expected {expected.tolist()}, got {got.tolist()}")


@exercise("pack_int4")
def _pack_int4(fn: Callable) -> None:
    """``fn(codes)``: (in, out) integers in [0, 15] -> (in / 8, out) int32, GPTQ's ``qweight`` words."""
    generator = torch.Generator().manual_seed(0)
    cases = [("one column 0..7: the first row goes in the lowest 4 bits", torch.arange(8).reshape(8, 1)),
             ("a 15 in the eighth row: the word's top bit is set, so the int32 is negative",
              torch.tensor([[0], [0], [0], [0], [0], [0], [0], [15]])),
             ("random codes, 32 rows and 3 columns: 4 words per column", torch.randint(0, 16, (32, 3),
                                                                                       generator=generator))]
    for case, codes in cases:
        expected = _pack_int32(codes, 4)
        got, _ = _call("pack_int4", case, fn, (codes,))
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != torch.int32:
            raise AssertionError(f"pack_int4: case '{case}': expected an int32 tensor of shape "
                                 f"{tuple(expected.shape)}, got {getattr(got, 'dtype', type(got).__name__)} "
                                 f"{tuple(getattr(got, 'shape', ()))}")
        if not torch.equal(got, expected):
            raise AssertionError(f"pack_int4: case '{case}': expected {expected.tolist()}, got {got.tolist()}")
