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

__all__ = ["rtn_quantize", "gptq_quantize", "gptq_sequential", "gptq_checkpoint_tensors"]


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


def _pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integers in [0, 2^bits) -> (rows · bits / 32, cols) int32: value k of each run of 32 / bits
    rows at bits [k · bits, (k + 1) · bits) of its word (the low bits first)."""
    per_word = 32 // bits
    runs = values.to(torch.int64).reshape(-1, per_word, values.shape[1])
    words = sum(runs[:, k] << (k * bits) for k in range(per_word))
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()  # the same 32 bits


def gptq_checkpoint_tensors(entry: dict, bits: int = 4, symmetric: bool = False) -> dict[str, torch.Tensor]:
    """One Linear's codes and grid (from :func:`gptq_quantize` or :func:`rtn_quantize`) as a GPTQ checkpoint
    stores them (AutoGPTQ's layout, read by transformers, vLLM and ONNX Runtime GenAI's model builder):

    * ``qweight`` int32 (in · bits / 32, out): the unsigned codes of Wᵀ, 32 / bits input rows per word;
    * ``qzeros`` int32 (groups, out · bits / 32): zero point − 1 (the format's historical offset, modulo 2^bits),
      packed along the outputs;
    * ``scales`` float16 (groups, out); ``g_idx`` int32 (in,): each input column's group.

    De-quantized, W_ij = (q_ij − z) · s with q, z unsigned; a symmetric grid's signed codes and zero (0) are
    shifted by 2^(bits−1). Pass the ``symmetric`` the codes were made with.
    """
    if not isinstance(entry, dict) or not {"codes", "scale", "zero_point"} <= set(entry):
        raise TypeError("entry must be a dict with 'codes', 'scale' and 'zero_point', as gptq_quantize returns")
    bits = check_int("bits", bits, min=2, max=8)
    if 32 % bits:
        raise ValueError(f"bits must divide 32 (2, 4 or 8) to pack into int32 words, got {bits}")
    codes, scale, zero = (check_tensor(name, entry[key], ndim=2) for name, key in
                          (("codes", "codes"), ("scale", "scale"), ("zero_point", "zero_point")))
    out_features, in_features = codes.shape
    groups = scale.shape[1]
    if scale.shape != zero.shape or scale.shape[0] != out_features or in_features % groups:
        raise ValueError(f"codes {tuple(codes.shape)}, scale {tuple(scale.shape)} and zero_point "
                         f"{tuple(zero.shape)} do not describe one grid per row and group")
    if in_features % (32 // bits) or out_features % (32 // bits):
        raise ValueError(f"both dimensions must be multiples of {32 // bits} to pack {bits}-bit values in int32, "
                         f"got {tuple(codes.shape)}")
    offset = 2 ** (bits - 1) if check_bool("symmetric", symmetric) else 0
    unsigned, zeros = codes.to(torch.int64) + offset, zero.to(torch.int64) + offset
    if unsigned.min() < 0 or unsigned.max() >= 2**bits or zeros.min() < 0 or zeros.max() >= 2**bits:
        raise ValueError(f"codes and zero points must lie on the {bits}-bit grid (symmetric={symmetric})")
    return {"qweight": _pack_int32(unsigned.T, bits),
            "qzeros": _pack_int32((zeros - 1) % 2**bits, bits).T.contiguous(),  # zeros is (out, groups)
            "scales": scale.T.to(torch.float16).contiguous(),
            "g_idx": (torch.arange(in_features) // (in_features // groups)).to(torch.int32)}
