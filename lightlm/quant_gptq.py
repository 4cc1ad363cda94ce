"""GPTQ (Frantar et al. 2023): round-to-nearest made error-aware, one column at a time (chapter 10).

Round-to-nearest (RTN) quantizes each weight on its own. GPTQ minimises the layer's output error
‖WX − ŴX‖² instead, with the very skeleton SparseGPT uses for pruning (:func:`lightlm.prune_calib.obs_walk`):
with H = 2XᵀX/tokens (+ 1 % dampening) and U the upper Cholesky factor of H⁻¹, it walks the input columns left
to right; column j is rounded to the grid, q_j = Q(w_j), and its error, scaled by 1/U_jj, is spread over the
columns not yet rounded, W_{:, j+1:} −= (w_j − q_j)/U_jj · U_{j, j+1:}, so later columns absorb what earlier ones
lost. The grid is :mod:`lightlm.quant`'s affine one (asymmetric by default, as the reference), one (scale,
zero point) per output row, or per row and group of ``group_size`` columns, chosen from the weights as updated so
far when the walk reaches the group's first column (the reference reads them before the current block's own
updates; with a group equal to the block the two agree). When the inputs are uncorrelated (H diagonal) nothing
is spread and GPTQ is exactly RTN. :func:`gptq_sequential` quantizes a model's Linears in call order, each
calibrated on the outputs of the layers already quantized (:func:`lightlm.calibrate.calibrate_sequential`).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ._checks import check_bool, check_int, check_module, check_real, check_tensor
from .calibrate import calibrate_sequential
from .prune_calib import inverse_hessian_factor, obs_walk
from .quant import dequantize, int_range, qparams, quantize

__all__ = ["rtn_quantize", "gptq_quantize", "gptq_sequential"]


def _check(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool):
    check_tensor("weight", weight, kind="float", ndim=2)
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite (no NaN or inf) to be quantized")
    bits = check_int("bits", bits, min=2, max=8)
    cols = weight.shape[1]
    group = cols if group_size is None else check_int("group_size", group_size, min=1)
    if cols % group:
        raise ValueError(f"group_size={group} must divide the layer's input width {cols}: a group may not be cut "
                         "(nothing is skipped)")
    return bits, group, int_range(bits, signed=check_bool("symmetric", symmetric))


def _grid(w: torch.Tensor, qrange: tuple[int, int], symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) per row of w (rows, group) from its min and max, as MinMaxObserver."""
    return qparams(w.amin(dim=1), w.amax(dim=1), *qrange, symmetric=symmetric)


def _pack(codes: list, scales: list, zeros: list, weight: torch.Tensor) -> dict:
    q = torch.cat(codes, dim=1)
    scale, zero_point = torch.stack(scales, dim=1), torch.stack(zeros, dim=1)
    group = weight.shape[1] // scale.shape[1]
    deq = dequantize(q.reshape(-1, group), scale.reshape(-1), zero_point.reshape(-1), axis=0,
                     dtype=scale.dtype).reshape(q.shape)
    return {"weight": deq.to(weight.dtype), "codes": q, "scale": scale, "zero_point": zero_point}


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int | None = None,
                 symmetric: bool = False) -> dict:
    """Round-to-nearest on GPTQ's grid, the baseline GPTQ is measured against: one affine (scale, zero point)
    per output row, or per row and group of ``group_size`` input columns.

    Returns ``{"weight": Ŵ (weight's dtype), "codes": int64 (out, in), "scale", "zero_point": (out, groups)}``.
    """
    bits, group, qrange = _check(weight, bits, group_size, symmetric)
    W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    codes, scales, zeros = [], [], []
    for g in range(0, W.shape[1], group):
        scale, zero = _grid(W[:, g:g + group], qrange, symmetric)
        codes.append(quantize(W[:, g:g + group], scale, zero, *qrange, axis=0))
        scales.append(scale)
        zeros.append(zero)
    return _pack(codes, scales, zeros, weight)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = None,
                  symmetric: bool = False, blocksize: int = 128, damp: float = 0.01) -> dict:
    """GPTQ on one weight (out, in) with ``hessian`` (in, in), e.g. :func:`lightlm.prune_calib.hessian`.

    ``blocksize`` columns are updated at a time (the lazy batch update; must be a multiple of ``group_size``);
    λ = damp · mean(diag H) is added to H's diagonal. Columns never seen (diag H = 0) are set to 0 first, as in
    the reference. Returns the same dict as :func:`rtn_quantize`.
    """
    bits, group, qrange = _check(weight, bits, group_size, symmetric)
    check_tensor("hessian", hessian, kind="float", ndim=2)
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for a weight with {cols} inputs, got "
                         f"{tuple(hessian.shape)} (calibration inputs of the wrong width?)")
    blocksize = check_int("blocksize", blocksize, min=1)
    if group < cols and blocksize % group:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of group_size ({group})")
    damp = check_real("damp", damp, min=0)
    W = weight.detach().to(torch.promote_types(weight.dtype, torch.float32)).clone()
    U, _ = inverse_hessian_factor(hessian.to(W.device), W, damp)
    codes, scales, zeros = [], [], []
    if group == cols:  # one grid per row, from the whole (dead columns zeroed) weight, as the reference
        scale, zero = _grid(W, qrange, symmetric)
        scales.append(scale)
        zeros.append(zero)

    def round_column(j: int, rest: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if group < cols and j % group == 0:
            scale, zero = _grid(rest[:, :group], qrange, symmetric)
            scales.append(scale)
            zeros.append(zero)
        q = quantize(rest[:, :1], scales[-1], zeros[-1], *qrange, axis=0)
        codes.append(q)
        return dequantize(q, scales[-1], zeros[-1], axis=0, dtype=W.dtype)[:, 0]

    obs_walk(W, U, round_column, blocksize)
    return _pack(codes, scales, zeros, weight)


def gptq_sequential(model: nn.Module, calibration, bits: int = 4, group_size: int | None = None, *,
                    symmetric: bool = False, groups: Iterable | None = None, blocksize: int = 128,
                    damp: float = 0.01) -> dict[str, dict]:
    """GPTQ on a model's Linears, in place, one group at a time in call order, each calibrated on the outputs of
    the groups already quantized (:func:`lightlm.calibrate.calibrate_sequential`; the output head is left out).

    The weights are overwritten by their de-quantized values (what a weight-only int kernel multiplies by);
    returns ``{module name: {"codes", "scale", "zero_point"}}``, the integers and grids to store.
    """
    check_module("model", model)
    stored = {}

    def quantize_layer(name: str, module: nn.Linear, total: torch.Tensor, tokens: int) -> None:
        result = gptq_quantize(module.weight, 2 * total / tokens, bits, group_size, symmetric, blocksize, damp)
        module.weight.copy_(result.pop("weight"))
        stored[name] = result

    calibrate_sequential(model, calibration, quantize_layer, "gram", groups)
    return stored
