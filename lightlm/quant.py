"""Affine (uniform) quantization, the foundation of chapter 10 ("Quantization"): pure torch.

A real number x is stored as an integer q in [qmin, qmax] with a scale s and a zero point z,

    q = clamp(round(x / s) + z, qmin, qmax),        x̂ = s · (q − z),

so every x inside the representable range [s·(qmin − z), s·(qmax − z)] comes back within s/2. :func:`qparams`
chooses (s, z) from an observed range exactly as ``torch.ao.quantization.MinMaxObserver`` does (the range is first
widened to include 0, so that 0 is stored exactly; s ≥ float32 eps; ``round`` is round-half-to-even), for any
integer range, hence any bit width and ``reduce_range``. :func:`quantize`, :func:`dequantize` and
:func:`fake_quantize` work per tensor, per channel (one (s, z) per slice along ``axis``) or per group (one per
``group_size`` consecutive values of the last dimension). :func:`fake_quantize` has the straight-through gradient
of ``torch.fake_quantize_per_tensor_affine``: the identity where x was not clamped, zero where it was.
:func:`pack_int4` stores two 4-bit values per byte. The non-uniform formats (GGUF blocks, NF4, code books) are in
:mod:`lightlm.quant_formats`. Only torch is imported.
"""

from __future__ import annotations

import torch

from ._checks import check_bool, check_int, check_tensor

__all__ = ["int_range", "qparams", "observe", "quantize", "dequantize", "fake_quantize", "pack_int4", "unpack_int4"]

_EPS = torch.finfo(torch.float32).eps


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """(qmin, qmax) of a ``bits``-bit integer (1 ≤ b ≤ 8): [−2^(b−1), 2^(b−1) − 1] signed, [0, 2^b − 1] unsigned."""
    bits = check_int("bits", bits, min=1, max=8)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if check_bool("signed", signed) else (0, 2**bits - 1)


def _check_range(qmin: int, qmax: int) -> tuple[int, int]:
    qmin, qmax = check_int("qmin", qmin, min=-128, max=255), check_int("qmax", qmax, min=-128, max=255)
    if qmin >= qmax:
        raise ValueError(f"qmin must be below qmax, got qmin={qmin}, qmax={qmax}")
    return qmin, qmax


def qparams(xmin: torch.Tensor, xmax: torch.Tensor, qmin: int, qmax: int,
            symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for observed minima and maxima (tensors of any shape, float), as MinMaxObserver.

    Affine: s = (max(xmax, 0) − min(xmin, 0)) / (qmax − qmin), z = clamp(qmin − round(min(xmin, 0) / s)).
    Symmetric: s = max(|min(xmin, 0)|, max(xmax, 0)) / ((qmax − qmin) / 2), z = 0 for a signed range, 128 for
    uint8's [0, 255] (torch's default range; given [0, 255] explicitly, torch takes the midpoint's floor, 127) and
    the floor of the midpoint for another unsigned range. ``zero_point`` is int64.
    """
    xmin, xmax = check_tensor("xmin", xmin, kind="float"), check_tensor("xmax", xmax, kind="float")
    qmin, qmax = _check_range(qmin, qmax)
    if not (torch.isfinite(xmin).all() and torch.isfinite(xmax).all()):
        raise ValueError("xmin and xmax must be finite (no NaN or inf): a range cannot be chosen from them")
    if (xmin > xmax).any():
        raise ValueError("xmin must not exceed xmax")
    low, high = torch.clamp(xmin, max=0.0), torch.clamp(xmax, min=0.0)
    eps = torch.tensor(_EPS, dtype=low.dtype, device=low.device)
    if check_bool("symmetric", symmetric):
        scale = torch.maximum(torch.maximum(-low, high) / ((qmax - qmin) / 2), eps)
        middle = 0 if qmin < 0 else (128 if (qmin, qmax) == (0, 255) else (qmin + qmax) // 2)
        zero_point = torch.full_like(scale, middle, dtype=torch.int64)
    else:
        scale = torch.maximum((high - low) / float(qmax - qmin), eps)
        zero_point = torch.clamp(qmin - torch.round(low / scale).to(torch.int64), qmin, qmax)
    return scale, zero_point


def _grouped(x: torch.Tensor, axis: int | None, group_size: int | None) -> tuple[torch.Tensor, int | None]:
    """x viewed so that one (s, z) belongs to each slice along the returned axis (None: the whole tensor)."""
    if group_size is not None:
        if axis is not None:
            raise ValueError("give axis (per channel) or group_size (per group), not both")
        group_size = check_int("group_size", group_size, min=1)
        if x.ndim == 0 or x.shape[-1] % group_size:
            raise ValueError(f"group_size={group_size} must divide the last dimension, "
                             f"{x.shape[-1] if x.ndim else 'none'}: a group may not be cut (nothing is skipped)")
        return x.reshape(-1, group_size), 0
    if axis is not None:
        axis = check_int("axis", axis, min=-x.ndim, max=x.ndim - 1) % x.ndim
    return x, axis


def _per_slice(values: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """Per-slice parameters shaped to broadcast against a tensor of ``ndim`` dims along ``axis``."""
    if axis is None:
        return values
    return values.reshape([-1 if d == axis else 1 for d in range(ndim)])


def observe(x: torch.Tensor, axis: int | None = None, group_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """(xmin, xmax) of a float tensor: over all of it, per slice along ``axis``, or per group of the last dim."""
    x = check_tensor("x", x, kind="float")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite (no NaN or inf): its range cannot be observed")
    view, axis = _grouped(x, axis, group_size)
    if axis is None:
        return view.min(), view.max()
    dims = [d for d in range(view.ndim) if d != axis]
    return view.amin(dim=dims), view.amax(dim=dims)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             axis: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """q = clamp(round(x · (1/s) + z), qmin, qmax) as int64, the arithmetic of torch's fake-quantize kernels."""
    return _quantize(x, scale, zero_point, qmin, qmax, axis, group_size)[0]


def _quantize(x, scale, zero_point, qmin, qmax, axis, group_size):
    x = check_tensor("x", x, kind="float")
    qmin, qmax = _check_range(qmin, qmax)
    view, axis = _grouped(x, axis, group_size)
    scale = _per_slice(torch.as_tensor(scale, dtype=x.dtype, device=x.device), axis, view.ndim)
    zero_point = _per_slice(torch.as_tensor(zero_point, device=x.device), axis, view.ndim)
    unclamped = torch.round(view * (1.0 / scale) + zero_point)
    q = unclamped.clamp(qmin, qmax).to(torch.int64)
    return q.reshape(x.shape), ((unclamped >= qmin) & (unclamped <= qmax)).reshape(x.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None,
               group_size: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x̂ = s · (q − z), in ``dtype``."""
    q = check_tensor("q", q)
    view, axis = _grouped(q, axis, group_size)
    scale = _per_slice(torch.as_tensor(scale, dtype=dtype, device=q.device), axis, view.ndim)
    zero_point = _per_slice(torch.as_tensor(zero_point, device=q.device), axis, view.ndim)
    return ((view - zero_point).to(dtype) * scale).reshape(q.shape)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None = None, group_size: int | None = None) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype, with the clipped straight-through gradient (quantization-aware
    training): d out / d x = 1 where x was inside the range, 0 where it was clamped."""
    q, inside = _quantize(x, scale, zero_point, qmin, qmax, axis, group_size)
    out = dequantize(q, scale, zero_point, axis, group_size, dtype=x.dtype)
    return out.detach() + (x - x.detach()) * inside


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit integers per byte (uint8), the first of each pair in the low nibble; the last dimension must be
    even. Signed values in [−8, 7] are stored as two's complement nibbles, unsigned ones in [0, 15] as they are."""
    q = check_tensor("q", q, kind="int")
    if q.ndim == 0 or q.shape[-1] % 2:
        raise ValueError(f"the last dimension of q must be even to pair values, got shape {tuple(q.shape)}")
    if q.numel() and (q.min() < -8 or q.max() > 15):
        raise ValueError("q must fit 4 bits: values in [-8, 7] (signed) or [0, 15] (unsigned)")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int8 values (last dimension doubled), sign-extended if ``signed``."""
    packed = check_tensor("packed", packed)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (as pack_int4 returns it), got {packed.dtype}")
    low, high = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    q = torch.stack([low, high], dim=-1).flatten(-2)
    return torch.where(q > 7, q - 16, q) if check_bool("signed", signed) else q

