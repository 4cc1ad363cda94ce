"""Integer storage and the int8 matmul (整数存储与 int8 矩阵乘), chapter 10: ``QuantLinear``, ``quantize_model``.

**Weight-only.** Each output row i of an nn.Linear's weight W (out, in) — or each group of ``group_size``
consecutive input columns of that row — is stored as b-bit integers with one scale s (and, if asymmetric, one
zero point z), chosen by :func:`lightlm.quant.qparams` (torch's MinMaxObserver) on the signed range
[qmin, qmax] = [−2^(b−1), 2^(b−1) − 1]:

    Q_ij = clamp(round(W_ij / s) + z, qmin, qmax),        Ŵ_ij = s · (Q_ij − z).

The forward dequantizes Ŵ and computes y = x Ŵᵀ + b in x's dtype: the memory shrinks, the arithmetic does not.

**W8A8 (dynamic int8).** The activations are quantized too, at run time, one symmetric scale a_t per token t
(the same per-row rule as the weight's per-channel scales s_i, [qmin, qmax] = [−128, 127], as torchao):

    X_tj ≈ a_t · P_tj,     W_ij ≈ s_i · Q_ij,     y_ti = a_t · s_i · Σ_j P_tj Q_ij  (+ b_i),

so the sum over j runs on int8 × int8 products accumulated in int32, and one multiplication per output rescales
it. ``torch._int_mm`` (torch 2.13) computes Σ_j P_tj Q_ij. On the CPU it takes any two 2-D int8 matrices whose
inner sizes agree (1 row, odd widths, transposed views: all accepted, checked exactly), but returns wrong sums
for a matrix with a size-1 dimension whose stride is not the row-major one (W.t() of a one-column W):
:func:`int8_matmul` copies such operands first. On CUDA it needs more than 16 rows and inner and output widths
that are multiples of 8; where a shape is refused, :func:`int8_matmul` computes the same sums in float64 —
exactly, since every partial sum is an integer below 2^31 < 2^53. |P_tj Q_ij| ≤ 2^14, so an int32 accumulator
cannot overflow while in_features < 2^17.

**Storage** (``state_dict`` holds these real tensors, so a saved model is small): codes int8 for 5–8 bits, two
codes per byte (uint8, :func:`lightlm.quant.pack_int4`) for 2–4 bits — 2 and 3 bits take a nibble too; scales in
**float32** — 32/group_size bits per weight (0.08 per weight for a 384-wide row, 1 at group 32): fp16 scales would
halve that, but round every scale a second time, and Ŵ would no longer be torch's fake-quantized weight bit for
bit; zero points int8 (asymmetric only); the bias stays in float.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_bool, check_choice, check_int, check_module, check_module_names, check_tensor, names_module
from .quant import dequantize, int_range, observe, pack_int4, qparams, quantize, unpack_int4

__all__ = ["int8_matmul", "quantize_per_row", "dynamic_int8_linear", "QuantLinear", "quantize_model"]

_MAX_INNER = 2**31 // 2**14 - 1  # |P·Q| ≤ 128·128 = 2^14: the int32 sum of this many products cannot overflow


def _plain_strides(matrix: torch.Tensor) -> torch.Tensor:
    """The matrix row- or column-major with its own leading dimension: torch calls a (1, k) matrix with strides
    (1, 1) contiguous (a size-1 dimension's stride is ignored), but ``torch._int_mm`` on the CPU reads that stride
    as the leading dimension and returns wrong sums (torch 2.13; e.g. ``W.t()`` of a one-column W)."""
    rows, cols = matrix.shape
    if rows > 1 and cols > 1:
        return matrix if matrix.is_contiguous() or matrix.t().is_contiguous() else matrix.contiguous()
    return torch.empty_strided((rows, cols), (cols, 1), dtype=matrix.dtype, device=matrix.device).copy_(matrix)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact int32 product of int8 matrices a (m, k) and b (k, n): ``torch._int_mm`` where it accepts the
    shapes (always on the CPU; on CUDA when m > 16 and k, n are multiples of 8), else float64 sums (exact)."""
    for name, value in (("a", a), ("b", b)):
        check_tensor(name, value, ndim=2)
        if value.dtype != torch.int8:
            raise TypeError(f"{name} must be an int8 tensor, got dtype {value.dtype}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)}: a's columns must match b's rows")
    if a.shape[1] > _MAX_INNER:
        raise ValueError(f"the inner size {a.shape[1]} could overflow the int32 sums: at most {_MAX_INNER}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on one device, got {a.device} and {b.device}")
    m, k = a.shape
    n = b.shape[1]
    if a.device.type == "cpu":
        return torch._int_mm(_plain_strides(a), _plain_strides(b))
    if a.device.type == "cuda" and m > 16 and k > 0 and k % 8 == 0 and n % 8 == 0:
        return torch._int_mm(_plain_strides(a), b.contiguous())  # cuBLAS may misread a strided b (see torchao)
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)  # integers < 2^31: float64 is exact


def quantize_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a 2-D float tensor with one scale per row ("vector-wise": a token of activations,
    an output channel of a weight): ``(codes int8 (rows, cols), scales float32 (rows, 1))``.

    a = max|x_row| / 127.5 (MinMaxObserver's symmetric scale on [−128, 127], torchao's too; at least float32 eps),
    P = clamp(round(x / a), −128, 127) — :func:`lightlm.quant.quantize` with z = 0, computed in float32.
    """
    check_tensor("x", x, kind="float", ndim=2)
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one column, got shape {tuple(x.shape)}")
    x32 = x.to(torch.float32)
    xmin, xmax = x32.amin(dim=1), x32.amax(dim=1)  # (a NaN propagates into both: one check covers NaN and inf)
    if not (torch.isfinite(xmin).all() and torch.isfinite(xmax).all()):
        raise ValueError("x must be finite (no NaN or inf) to be quantized")
    scale, _ = qparams(xmin, xmax, -128, 127, symmetric=True)  # a_t = max_j |X_tj| / 127.5
    scale = scale[:, None]
    codes = (x32 * (1.0 / scale)).round_().clamp_(-128, 127).to(torch.int8)  # P_tj = clamp(round(X_tj / a_t))
    return codes, scale


def dynamic_int8_linear(x: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = a_t · s_i · Σ_j P_tj Q_ij + b_i: x (..., in) quantized per token at run time, int8 weight codes
    (out, in) with per-row scales (out, 1) (:func:`quantize_per_row` of W), the sum in int32; y in x's dtype."""
    check_tensor("x", x, kind="float", min_ndim=1)
    check_tensor("weight_scale", weight_scale, kind="float")
    check_tensor("weight_codes", weight_codes, ndim=2)
    if x.shape[-1] != weight_codes.shape[1]:
        raise ValueError(f"x has width {x.shape[-1]} but the weight codes {tuple(weight_codes.shape)} take "
                         f"{weight_codes.shape[1]} input features")
    p, a = quantize_per_row(x.reshape(-1, x.shape[-1]))       # X_tj ≈ a_t · P_tj
    acc = int8_matmul(p, weight_codes.t())                    # Σ_j P_tj Q_ij, int32 (tokens, out)
    y = acc.to(torch.float32).mul_(a).mul_(weight_scale.reshape(1, -1).to(torch.float32))  # · a_t · s_i
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(x.dtype).reshape(*x.shape[:-1], weight_codes.shape[0])


def _check_spec(bits, group_size, symmetric, activations) -> tuple:
    bits = check_int("bits", bits, min=2, max=8)
    if group_size is not None:
        group_size = check_int("group_size", group_size, min=1)
    symmetric = check_bool("symmetric", symmetric)
    check_choice("activations", activations, (None, "int8"))
    if activations == "int8" and (bits != 8 or group_size is not None or not symmetric):
        raise ValueError("activations='int8' (W8A8) takes bits=8, group_size=None and symmetric=True (one scale "
                         f"per output channel), got bits={bits}, group_size={group_size}, symmetric={symmetric}")
    return bits, group_size, symmetric, activations


def _check_layer(name: str, linear: nn.Linear, group_size: int | None) -> None:
    """A Linear that can be quantized as asked: its width divisible into groups, its weight finite."""
    if group_size is not None and linear.in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input width of {name} (in_features="
                         f"{linear.in_features}): a group may not be cut, and no layer is skipped silently")
    if not torch.isfinite(linear.weight).all():
        raise ValueError(f"the weight of {name} has NaN or inf entries: it cannot be quantized")


class QuantLinear(nn.Module):
    """An nn.Linear stored as integers (see the module docstring); build it with :meth:`from_linear`.

    Buffers: ``codes`` (int8 (out, in) for 5–8 bits; uint8 (out, ⌈in/2⌉), two codes per byte, for 2–4 bits),
    ``scale`` (float32 (out, groups); groups = 1 per channel), ``zero_point`` (int8 (out, groups); asymmetric
    only), ``bias`` (float, or absent). ``activations='int8'`` runs the W8A8 forward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: int | None = None, symmetric: bool = True, activations: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, min=1)
        self.out_features = check_int("out_features", out_features, min=1)
        self.bits, self.group_size, self.symmetric, self.activations = _check_spec(bits, group_size, symmetric,
                                                                                   activations)
        if group_size is not None and in_features % group_size:
            raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
        groups = 1 if group_size is None else in_features // group_size
        packed = (out_features, (in_features + 1) // 2) if bits <= 4 else (out_features, in_features)
        self.register_buffer("codes", torch.zeros(packed, dtype=torch.uint8 if bits <= 4 else torch.int8,
                                                  device=device))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        zero_point = None if symmetric else torch.zeros(out_features, groups, dtype=torch.int8, device=device)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if check_bool(
            "bias", bias) else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                    activations: str | None = None) -> "QuantLinear":
        """Quantize an nn.Linear: one (s, z) per output row, or per ``group_size`` input columns of each row
        (a size that does not divide in_features is a ValueError); ``activations='int8'`` for W8A8."""
        if not isinstance(check_module("linear", linear), nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        bits, group_size, symmetric, activations = _check_spec(bits, group_size, symmetric, activations)
        _check_layer("linear", linear, group_size)
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits,
                     group_size=group_size, symmetric=symmetric, activations=activations, device=weight.device,
                     dtype=weight.dtype if linear.bias is None else linear.bias.dtype)
        rows = weight.to(torch.float32).reshape(-1, group_size or linear.in_features)  # one (s, z) per row here
        qmin, qmax = int_range(bits)
        scale, zero_point = qparams(*observe(rows, axis=0), qmin, qmax, symmetric=symmetric)
        codes = quantize(rows, scale, zero_point, qmin, qmax, axis=0).reshape(weight.shape)  # Q = clamp(round(W/s)+z)
        if bits <= 4:
            codes = pack_int4(F.pad(codes, (0, linear.in_features % 2)))  # two nibbles a byte (odd width: pad 0)
        module.codes.copy_(codes)
        module.scale.copy_(scale.reshape(module.scale.shape))
        if not symmetric:
            module.zero_point.copy_(zero_point.reshape(module.zero_point.shape))
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach())
        return module

    def int_codes(self) -> torch.Tensor:
        """The integer codes Q as int8 (out, in), unpacked where they are stored two per byte."""
        if self.bits > 4:
            return self.codes
        return unpack_int4(self.codes, signed=True)[:, :self.in_features]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = s · (Q − z), computed in float32, returned in ``dtype`` (out, in)."""
        groups = self.scale.shape[1]
        q = self.int_codes().to(torch.int32).reshape(self.out_features * groups, -1)
        zero_point = 0 if self.zero_point is None else self.zero_point.reshape(-1).to(torch.int32)
        weight = dequantize(q, self.scale.reshape(-1), zero_point, axis=0)  # Ŵ = s·(Q − z), one (s, z) per row
        return weight.reshape(self.out_features, self.in_features).to(dtype)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Store a new dense (out, in) weight, quantized with this layer's settings (how a LoRA update merges
        into an integer base, :func:`lightlm.lora.merge_lora`: it rounds)."""
        check_tensor("weight", weight, kind="float", ndim=2)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, this layer stores "
                             f"({self.out_features}, {self.in_features})")
        dense = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device)
        with torch.no_grad():
            dense.weight.copy_(weight)
        fresh = QuantLinear.from_linear(dense, self.bits, self.group_size, self.symmetric, self.activations)
        for name in ("codes", "scale", "zero_point"):
            if getattr(self, name) is not None:
                getattr(self, name).copy_(getattr(fresh, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Weight-only: y = x Ŵᵀ + b in x's dtype. W8A8: :func:`dynamic_int8_linear`."""
        check_tensor("x", x, kind="float", min_ndim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has width {x.shape[-1]}, this layer takes in_features={self.in_features}")
        if self.activations == "int8":
            return dynamic_int8_linear(x, self.codes, self.scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def nbytes(self) -> int:
        """The bytes the buffers really occupy (codes, scales, zero points, bias)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def extra_repr(self) -> str:
        """The layer's shape and quantization settings, shown by ``print(model)``."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, "
                f"activations={self.activations}")


def _skipped(linears: dict[str, nn.Linear], skip: Iterable[str]) -> set[str]:
    """The Linear names that ``skip`` names (exactly or as a dotted suffix); an entry matching none is an error."""
    found: set[str] = set()
    for entry in check_module_names("skip", skip, allow_empty=True):
        matches = {name for name in linears if names_module(name, entry)}
        if not matches:
            endings = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"skip entry {entry!r} names no nn.Linear of the model; its {len(linears)} Linears "
                             f"(e.g. {next(iter(linears))!r}) end in: {', '.join(endings)}")
        found |= matches
    return found


def quantize_model(model: nn.Module, bits: int = 8, group_size: int | None = None, skip: Iterable[str] | None = None,
                   activations: str | None = None, symmetric: bool = True) -> dict:
    """Replace the model's nn.Linear modules by :class:`QuantLinear` in place; returns a report.

    ``skip``: module names or dotted suffixes (``"lm_head"``, ``"classifier"``) to keep in float; an entry that
    matches no Linear is a ValueError listing them. ``None`` (the default) skips only the output head
    (``model.get_output_embeddings()``): SmolLM2's ``lm_head`` is tied to the input embedding, so quantizing it
    would store a second copy of the largest matrix instead of saving anything. Every layer is checked before
    any is replaced (group size, finite weights).

    Returns:
        ``{"replaced": [names], "skipped": [names], "bytes_before": int, "bytes_after": int}``: the bytes of
        the replaced layers' weights and biases before, and of their buffers after.
    """
    if isinstance(check_module("model", model), nn.Linear):
        raise TypeError("model is itself an nn.Linear: quantize it with QuantLinear.from_linear")
    bits, group_size, symmetric, activations = _check_spec(bits, group_size, symmetric, activations)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if not linears:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Linear to quantize")
    if skip is None:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        skipped = {name for name, module in linears.items() if module is head}
    else:
        skipped = _skipped(linears, skip)
    targets = [name for name in linears if name not in skipped]
    for name in targets:
        _check_layer(name, linears[name], group_size)
    before = after = 0
    for name in targets:
        linear = linears[name]
        before += sum(p.numel() * p.element_size() for p in linear.parameters())
        quantized = QuantLinear.from_linear(linear, bits, group_size, symmetric, activations)
        after += quantized.nbytes()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized)
    return {"replaced": targets, "skipped": sorted(skipped), "bytes_before": before, "bytes_after": after}
