"""Activation outliers in int8 matmuls (激活离群值), chapter 10: LLM.int8() and SmoothQuant, pure torch.

Large language models have a few input feature columns whose activations are 10–100× larger than the rest, in
every token. One per-token int8 scale a_t = max_j |X_tj| / 127.5 is then set by the outlier, and the ordinary
features fall into a handful of codes. Two remedies:

**LLM.int8()** (Dettmers et al. 2022) keeps the outlier columns O = {j : max_t |X_tj| > τ} (τ = 6) in floating
point and runs the others through vector-wise int8 (one scale per token of X, one per output row of W), with
the sum in int32 (:func:`lightlm.quant_linear.int8_matmul`):

    y_ti = Σ_{j∈O} X_tj W_ij  +  a_t · s_i · Σ_{j∉O} P_tj Q_ij.

**SmoothQuant** (Xiao et al. 2023) moves the difficulty from the activations to the weights, exactly: for any
s > 0, X W ᵀ = (X diag(s)⁻¹)(W diag(s))ᵀ, with per-column migration strengths

    s_j = max_t |X_tj|^α / max_i |W_ij|^(1−α)          (α = 0.5; W: all the Linears that read X),

and the division by s is folded into the preceding norm's weight (and bias), the multiplication into the
Linears' input columns, so the smoothed model computes the same function with flatter activations.
:func:`activation_absmax` collects max_t |X_tj| with forward hooks.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ._checks import check_module, check_real, check_tensor
from .calibrate import check_calibration, run_batch
from .quant_linear import int8_matmul, quantize_per_row

__all__ = ["llm_int8_matmul", "weight_absmax", "smooth_scales", "smoothquant_fold", "activation_absmax"]


def llm_int8_matmul(x: torch.Tensor, weight: torch.Tensor, threshold: float = 6.0,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8()'s mixed-precision decomposition of y = x Wᵀ (+ b): x (..., in), weight (out, in), float.

    Input columns where some token has |x| > ``threshold`` stay in x's dtype; the rest go through per-token ×
    per-row int8 with an int32 sum. ``threshold=inf`` is plain vector-wise int8; ``threshold=0`` keeps every
    non-zero column in float.

    Returns:
        ``(y, outliers)``: y (..., out) in x's dtype and the outlier column indices (int64, ascending).
    """
    check_tensor("x", x, kind="float", min_ndim=1)
    check_tensor("weight", weight, kind="float", ndim=2)
    threshold = check_real("threshold", threshold, min=0, finite=False)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has width {x.shape[-1]} but the weight {tuple(weight.shape)} takes {weight.shape[1]} "
                         "input features")
    if bias is not None and check_tensor("bias", bias, kind="float", ndim=1).shape[0] != weight.shape[0]:
        raise ValueError(f"bias has {bias.shape[0]} entries, the weight has {weight.shape[0]} output rows")
    x2 = x.reshape(-1, x.shape[-1])                                   # (tokens, in)
    if not torch.isfinite(x2).all():
        raise ValueError("x must be finite (no NaN or inf)")
    is_outlier = (x2.abs() > threshold).any(dim=0)                    # j ∈ O  ⇔  max_t |X_tj| > τ
    outliers = is_outlier.nonzero().flatten()
    regular = (~is_outlier).nonzero().flatten()
    y = x2[:, outliers] @ weight[:, outliers].to(x.dtype).t()         # Σ_{j∈O} X_tj W_ij, in float
    if regular.numel():
        p, a = quantize_per_row(x2[:, regular])                       # X_tj ≈ a_t · P_tj   (per token)
        q, s = quantize_per_row(weight[:, regular])                   # W_ij ≈ s_i · Q_ij   (per output row)
        acc = int8_matmul(p, q.t())                                   # Σ_{j∉O} P_tj Q_ij, int32
        y = y + (acc.to(torch.float32) * a * s.reshape(1, -1)).to(x.dtype)  # + a_t · s_i · Σ ...
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0]), outliers


def _linears(linears: Iterable[nn.Linear]) -> list[nn.Linear]:
    if isinstance(linears, nn.Module):
        linears = [linears]
    linears = list(linears)
    if not linears:
        raise ValueError("linears must name at least one nn.Linear")
    for linear in linears:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linears must be nn.Linear modules, got {type(linear).__name__}")
    widths = {linear.in_features for linear in linears}
    if len(widths) != 1:
        raise ValueError(f"the linears must read the same input, but their in_features differ: {sorted(widths)}")
    return linears


def weight_absmax(linears: Iterable[nn.Linear]) -> torch.Tensor:
    """max_i |W_ij| per input column j, over the rows of all the given Linears (which must share their input)."""
    linears = _linears(linears)
    return torch.stack([linear.weight.detach().abs().amax(dim=0) for linear in linears]).amax(dim=0)


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1−α) per input column (1-D tensors of the same width, ≥ 0).

    A column whose activations or weights are all zero has nothing to balance and gets s_j = 1. α = 1 flattens
    the activations (s_j = max|X_j|: all the difficulty moves to the weights), α = 0 the weights (s_j = 1/max|W_j|).
    """
    check_tensor("act_absmax", act_absmax, kind="float", ndim=1)
    check_tensor("weight_absmax", weight_absmax, kind="float", ndim=1)
    alpha = check_real("alpha", alpha, min=0, max=1)
    if act_absmax.shape != weight_absmax.shape:
        raise ValueError(f"act_absmax {tuple(act_absmax.shape)} and weight_absmax {tuple(weight_absmax.shape)} "
                         "must have one entry per input column each")
    for name, value in (("act_absmax", act_absmax), ("weight_absmax", weight_absmax)):
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"{name} must hold finite maxima of |values| (>= 0)")
    act, weight = act_absmax.to(torch.float32), weight_absmax.to(torch.float32)
    scales = act.pow(alpha) / weight.pow(1 - alpha)                   # s_j = max|X_j|^α / max|W_j|^(1−α)
    return torch.where((act == 0) | (weight == 0), torch.ones_like(scales), scales)


@torch.no_grad()
def smoothquant_fold(norm: nn.Module, linears: Iterable[nn.Linear], scales: torch.Tensor) -> None:
    """Fold the smoothing scales into a norm and the Linears that read its output, in place: γ_j ← γ_j / s_j
    (and β_j ← β_j / s_j for a LayerNorm), W_ij ← W_ij · s_j. The model's function is unchanged as long as the
    norm's output goes to those Linears only — a pre-norm block: ``input_layernorm`` → q, k, v and
    ``post_attention_layernorm`` → gate, up in Llama. (BERT's post-norm output also feeds the residual.)

    ``norm``: a module that multiplies by a 1-D ``weight`` (and adds an optional ``bias``): nn.LayerNorm,
    nn.RMSNorm, transformers' ``LlamaRMSNorm``. A norm computing (1 + γ) ⊙ x̂, as Gemma's, is not one.
    """
    check_module("norm", norm)
    linears = _linears(linears)
    width = linears[0].in_features
    gamma = getattr(norm, "weight", None)
    if not isinstance(gamma, torch.Tensor) or gamma.ndim != 1:
        raise ValueError(f"norm ({type(norm).__name__}) must have a 1-D weight to fold the scales into "
                         "(a LayerNorm without elementwise_affine has none)")
    if gamma.shape[0] != width:
        raise ValueError(f"norm has width {gamma.shape[0]}, the linears read {width} input features")
    check_tensor("scales", scales, kind="float", ndim=1)
    if scales.shape[0] != width:
        raise ValueError(f"scales has {scales.shape[0]} entries, the linears read {width} input features")
    if not torch.isfinite(scales).all() or (scales <= 0).any():
        raise ValueError("scales must be finite and > 0 (the fold divides by them)")
    gamma.div_(scales.to(gamma))                                      # γ_j / s_j: the norm now outputs X / s
    beta = getattr(norm, "bias", None)
    if isinstance(beta, torch.Tensor):
        beta.div_(scales.to(beta))                                    # β_j / s_j
    for linear in linears:
        linear.weight.mul_(scales.to(linear.weight))                  # W_ij · s_j: (X/s)(W diag s)ᵀ = X Wᵀ


@torch.no_grad()
def activation_absmax(model: nn.Module, batches, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """max_t |X_tj| per input column j of the named modules' inputs, over all tokens of all ``batches`` (tensors
    or dicts of model inputs), collected with forward pre-hooks. ``names``: module names (any module, e.g. the
    q_proj that reads a norm's output); None: every nn.Linear. Returns {name: float32 (in,)}."""
    check_module("model", model)
    modules = dict(model.named_modules())
    if names is None:
        names = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    else:
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"names must be module names (str), got {type(name).__name__}")
            if name not in modules:
                linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                raise ValueError(f"{name!r} is not a module of the model; its Linears include {linears[:6]}")
    if not names:
        raise ValueError("no module to observe: the model has no nn.Linear and no names were given")
    absmax: dict[str, torch.Tensor] = {}

    def record(name: str, args: tuple) -> None:
        x = args[0].detach()
        column_max = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).to(torch.float32)   # max_t |X_tj|
        absmax[name] = column_max if name not in absmax else torch.maximum(absmax[name], column_max)

    handles = [modules[name].register_forward_pre_hook(lambda module, args, name=name: record(name, args))
               for name in names]
    try:
        for batch in check_calibration(batches, "batches"):
            run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return absmax
