"""Low-rank factorization (低秩分解), chapter 9: a Linear replaced by two thinner ones from its truncated SVD,
plain or weighted by what the layer actually sees (activation-aware SVD).

A Linear computes y = x Wᵀ + b with W of shape (out, in). Its singular value decomposition W = U Σ Vᵀ
(σ_1 ≥ σ_2 ≥ … ≥ 0) truncated to the r largest values gives W_r = U_r Σ_r V_rᵀ, and by **Eckart–Young**

    ‖W − W_r‖_F = √(Σ_{i>r} σ_i²)   — the smallest error of any matrix of rank ≤ r.

W_r is applied as two Linears, x → A x (r × in, no bias) → B (A x) + b (out × r, the original bias), with Σ split
evenly: A = Σ_r^½ V_rᵀ and B = U_r Σ_r^½, so both factors have the same spectral norm √σ_1 (neither is tiny
or huge, which keeps fine-tuning and half precision well-behaved). Parameters: in·out (+ out) before,
r·(in + out) (+ out) after, so factorizing saves only while r < in·out / (in + out) (:func:`break_even_rank`:
192 for a square 384 × 384 weight, half its full rank). The rank is given directly or as the smallest r whose
squared singular values keep a fraction ``energy`` of ‖W‖_F² = Σ σ_i² (:func:`rank_for_energy`).

**Activation-aware SVD** (SVD-LLM, Wang et al. 2024): what matters is the error on the layer's outputs,
‖(W − Ŵ) Xᵀ‖_F for calibration inputs X (tokens, in), not on W. With the Gram matrix G = XᵀX = S Sᵀ (S its
lower Cholesky factor), ‖(W − Ŵ) Xᵀ‖_F² = tr((W − Ŵ) G (W − Ŵ)ᵀ) = ‖(W − Ŵ) S‖_F², so the best Ŵ of rank r is
the truncated SVD of the *whitened* weight W S mapped back: Ŵ = [W S]_r S⁻¹, with output error
√(Σ_{i>r} σ_i(W S)²). Then A = Σ_r^½ V_rᵀ S⁻¹ and B = U_r Σ_r^½; ``energy`` counts σ_i(W S). The scale of G does
not matter (XᵀX, XᵀX/tokens and the Hessian 2XᵀX/tokens give the same Ŵ), and G ∝ I gives plain SVD back.
A singular G (fewer tokens than inputs, a dead input) has no Cholesky factor (or one with a pivot S_jj² at
rounding level, below in·ε·max G_jj): only then λ·I is added, λ = ``damp`` · mean(diag G).

SVDs run in float32 at least (float64 stays float64); the new modules have the weight's dtype and device.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ._checks import check_int, check_module, check_real, check_tensor
from .calibrate import calibrate_sequential, check_calibration, linear_groups

__all__ = ["rank_for_energy", "energy_kept", "lowrank_params", "break_even_rank", "gram_matrix",
           "factorize_linear", "factorize_model"]


# --------------------------------------------------------------------------- choosing the rank


def _check_singular_values(singular_values: torch.Tensor) -> torch.Tensor:
    check_tensor("singular_values", singular_values, kind="float", ndim=1)
    if singular_values.numel() == 0:
        raise ValueError("singular_values must not be empty")
    # the answer is a Python int, so the (short) vector comes to the host, in float64 for the running sums
    values = singular_values.detach().cpu().to(torch.float64)
    if not torch.isfinite(values).all() or (values < 0).any():
        raise ValueError("singular_values must be finite and >= 0")
    return values.sort(descending=True).values


def energy_kept(singular_values: torch.Tensor) -> torch.Tensor:
    """The fraction of ‖W‖_F² that rank r keeps, for r = 1 … n: Σ_{i≤r} σ_i² / Σ_i σ_i² (float64, on the CPU;
    values are sorted in decreasing order first). All zero: every rank keeps everything (1.0)."""
    cumulative = _check_singular_values(singular_values).square().cumsum(0)     # Σ_{i≤r} σ_i²
    total = cumulative[-1]
    return cumulative / total if total > 0 else torch.ones_like(cumulative)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank r with Σ_{i≤r} σ_i² ≥ energy · Σ_i σ_i²  (energy in (0, 1]).

    ``energy=1`` keeps every non-zero singular value (the full rank of a full-rank W). Monotone: more energy
    never means a smaller rank.
    """
    energy = check_real("energy", energy, min=0, max=1, min_open=True)
    cumulative = _check_singular_values(singular_values).square().cumsum(0)     # Σ_{i≤r} σ_i²
    short = int((cumulative < energy * cumulative[-1]).sum())                    # ranks that keep too little
    return max(1, short + 1)


def _check_widths(d_in, d_out) -> tuple[int, int]:
    return check_int("d_in", d_in, min=1), check_int("d_out", d_out, min=1)


def lowrank_params(d_in: int, d_out: int, rank: int, bias: bool = True) -> tuple[int, int]:
    """``(dense, factorized)`` parameter counts: in·out (+ out) against r·(in + out) (+ out)."""
    d_in, d_out = _check_widths(d_in, d_out)
    rank = _check_rank(rank, d_in, d_out)
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False, got {type(bias).__name__}")
    extra = d_out if bias else 0
    return d_in * d_out + extra, rank * (d_in + d_out) + extra


def break_even_rank(d_in: int, d_out: int) -> float:
    """in·out / (in + out): a rank r saves parameters if and only if r < this (the bias is the same in both)."""
    d_in, d_out = _check_widths(d_in, d_out)
    return d_in * d_out / (d_in + d_out)


def _check_rank(rank, d_in: int, d_out: int) -> int:
    rank = check_int("rank", rank, min=1)
    if rank > min(d_in, d_out):
        raise ValueError(f"rank must be <= min(d_in, d_out) = {min(d_in, d_out)} for a {d_out} x {d_in} weight, "
                         f"got {rank}")
    return rank


# --------------------------------------------------------------------------- one Linear


def gram_matrix(inputs: torch.Tensor) -> torch.Tensor:
    """G = XᵀX (in × in) of calibration inputs (..., in), in float32 at least, on the inputs' device."""
    check_tensor("inputs", inputs, kind="float", min_ndim=1)
    x = inputs.detach().reshape(-1, inputs.shape[-1])
    x = x.to(torch.promote_types(x.dtype, torch.float32))                      # X: (tokens, in)
    return x.T @ x


def _whitening(gram: torch.Tensor, width: int, like: torch.Tensor, damp: float) -> torch.Tensor:
    """S, the lower Cholesky factor of G = S Sᵀ (of G + λI, λ = damp·mean(diag G), only if G is singular)."""
    check_tensor("gram", gram, kind="float", ndim=2)
    if gram.shape != (width, width):
        raise ValueError(f"gram must be (in, in) = ({width}, {width}) for this layer, got {tuple(gram.shape)}")
    g = gram.detach().to(device=like.device, dtype=like.dtype)
    g = (g + g.T) / 2                                                          # symmetric up to rounding
    if not torch.isfinite(g).all() or torch.diagonal(g).mean() <= 0:
        raise ValueError("gram must be a finite Gram matrix XᵀX with a positive diagonal")
    factor, info = torch.linalg.cholesky_ex(g)                                 # G = S Sᵀ
    tiny = width * torch.finfo(g.dtype).eps * torch.diagonal(g).max()          # a pivot at rounding level: singular
    if info == 0 and torch.diagonal(factor).square().min() > tiny:
        return factor
    shift = damp * torch.diagonal(g).mean()
    factor, info = torch.linalg.cholesky_ex(g + shift * torch.eye(width, dtype=g.dtype, device=g.device))
    if info != 0:
        raise ValueError(f"gram + {damp}·mean(diag)·I is not positive definite: is gram XᵀX? (else raise damp)")
    return factor


def _spec(rank, energy, damp) -> tuple:
    """Exactly one of a rank (an int >= 1) or an energy fraction in (0, 1]; damp > 0."""
    if (rank is None) == (energy is None):
        raise ValueError("give either rank or energy (the fraction of Σσ² to keep), not both and not neither")
    rank = None if rank is None else check_int("rank", rank, min=1)
    energy = None if energy is None else check_real("energy", energy, min=0, max=1, min_open=True)
    return rank, energy, check_real("damp", damp, min=0, min_open=True)


@torch.no_grad()
def _factorize(linear: nn.Linear, rank, energy, gram, damp) -> tuple[nn.Sequential, int, float]:
    """The two Linears, the rank and the fraction of energy (of σ(W) or σ(W S)) they keep."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    rank, energy, damp = _spec(rank, energy, damp)
    d_out, d_in = linear.weight.shape
    rank = None if rank is None else _check_rank(rank, d_in, d_out)
    weight = linear.weight.detach()
    check_tensor("linear.weight", weight, kind="float")
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))            # W in float32 at least
    whitening = None if gram is None else _whitening(gram, d_in, w, damp)
    u, sigma, vh = torch.linalg.svd(w if whitening is None else w @ whitening, full_matrices=False)  # (W S) = UΣVᵀ
    if rank is None:
        rank = rank_for_energy(sigma, energy)
    kept = float(energy_kept(sigma)[rank - 1])
    root = sigma[:rank].sqrt()                                                 # Σ_r^½
    first = root[:, None] * vh[:rank]                                          # A = Σ_r^½ V_rᵀ      (r, in)
    if whitening is not None:
        first = torch.linalg.solve_triangular(whitening, first, upper=False, left=False)  # A S⁻¹: solves Z S = A
    second = u[:, :rank] * root                                                # B = U_r Σ_r^½       (out, r)
    factory = {"device": weight.device, "dtype": weight.dtype}
    down, up = nn.Linear(d_in, rank, bias=False, **factory), nn.Linear(rank, d_out, bias=linear.bias is not None,
                                                                          **factory)
    down.weight.copy_(first)
    up.weight.copy_(second)
    if linear.bias is not None:
        up.bias.copy_(linear.bias)
    return nn.Sequential(down, up), rank, kept


def factorize_linear(linear: nn.Linear, rank: int | None = None, energy: float | None = None, *,
                     gram: torch.Tensor | None = None, damp: float = 0.01) -> nn.Sequential:
    """A Linear as two thinner Linears from its truncated SVD: ``Sequential(A: in→r, no bias; B: r→out, bias b)``.

    Args:
        linear: the ``nn.Linear`` to factorize (left unchanged).
        rank: the rank r, 1 ≤ r ≤ min(in, out); or
        energy: the fraction in (0, 1] of Σσ_i² to keep, r chosen by :func:`rank_for_energy`.
        gram: calibration Gram matrix XᵀX (in × in, e.g. :func:`gram_matrix`) for activation-aware SVD, which
            minimises the output error ‖(W − Ŵ)Xᵀ‖_F instead of ‖W − Ŵ‖_F; ``energy`` then counts σ(W S).
        damp: relative dampening λ = damp·mean(diag G), added only if G is singular.

    A = Σ_r^½ V_rᵀ (S⁻¹) and B = U_r Σ_r^½; new modules on the weight's device, in its dtype.
    """
    return _factorize(linear, rank, energy, gram, damp)[0]


# --------------------------------------------------------------------------- a model


def _targets(model: nn.Module, names) -> list[str]:
    if not isinstance(names, str) and not hasattr(names, "__iter__"):
        raise TypeError(f"names must be a module name or a list of them, got {type(names).__name__}")
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("names must list at least one module name")
    modules = dict(model.named_modules())
    linears = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    linears = f"{linears[:12]}" + (f" … ({len(linears)} in all)" if len(linears) > 12 else "")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"names must be module names (str), got {type(name).__name__}")
        if name not in modules:
            raise ValueError(f"unknown module name {name!r}; the model's nn.Linear modules are: {linears}")
        if not isinstance(modules[name], nn.Linear):
            raise ValueError(f"module {name!r} is a {type(modules[name]).__name__}, not an nn.Linear; the model's "
                             f"nn.Linear modules are: {linears}")
    if len(set(names)) != len(names):
        raise ValueError(f"a module is named twice: {sorted({n for n in names if names.count(n) > 1})}")
    return names


def factorize_model(model: nn.Module, names: str | Iterable[str], rank: int | None = None,
                    energy: float | None = None, *, calibration=None, damp: float = 0.01) -> dict:
    """Replace the named nn.Linear modules of a model (a Hugging Face model, any nn.Module) by their
    factorizations, in place; every layer is checked before any is replaced.

    Args:
        names: exact module names, e.g. ``"encoder.layer.0.intermediate.dense"``; a name that is not an
            nn.Linear of the model is a ValueError listing the Linears.
        rank, energy: as in :func:`factorize_linear` (one rank or one energy fraction for every layer).
        calibration: None for plain SVD; a list of batches (tensors or dicts of model inputs) for
            activation-aware SVD, each layer whitened with the XᵀX of its inputs, collected sequentially
            (:func:`lightlm.calibrate.calibrate_sequential`: layers replaced earlier shape the inputs of later ones).
        damp: see :func:`factorize_linear`.

    Returns:
        ``{"layers": {name: {"shape": (out, in), "rank", "energy", "params_before", "params_after"}},
        "params_before", "params_after"}``: energy is the fraction of Σσ² kept, params those of the layers.
    """
    check_module("model", model)
    names = _targets(model, names)
    rank, energy, damp = _spec(rank, energy, damp)
    modules = dict(model.named_modules())
    for name in names:  # fail before touching the model
        if rank is not None:
            _check_rank(rank, modules[name].in_features, modules[name].out_features)
    report: dict = {"layers": {}, "params_before": 0, "params_after": 0}

    def replace(name: str, linear: nn.Linear, gram=None, tokens=None) -> None:
        factorized, r, kept = _factorize(linear, rank, energy, gram, damp)
        before, after = (sum(p.numel() for p in m.parameters()) for m in (linear, factorized))
        report["layers"][name] = {"shape": tuple(linear.weight.shape), "rank": r, "energy": kept,
                                  "params_before": before, "params_after": after}
        report["params_before"] += before
        report["params_after"] += after
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, factorized)

    if calibration is None:
        for name in names:
            replace(name, modules[name])
        return report
    calibration = check_calibration(calibration)
    order = [[n for n in group if n in names] for group in linear_groups(model, calibration[0])]
    groups = [group for group in order if group]
    missing = sorted(set(names) - {n for group in groups for n in group})
    if missing:
        raise ValueError(f"modules {missing} are not called by the model's forward on the calibration batches "
                         "(or are its output head, which calibration leaves out)")
    calibrate_sequential(model, calibration, replace, "gram", groups)
    return report
