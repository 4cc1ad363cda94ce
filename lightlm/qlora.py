"""QLoRA-style fine-tuning (Dettmers et al. 2023), chapter 12: a frozen NF4 base under trainable fp32 LoRA.

**The base in NF4.** Every frozen nn.Linear W (out, in) is stored as NF4 blocks (:mod:`lightlm.quant_formats`):
per block of B = 64 consecutive weights, 4-bit indices i into the 16 normal-float levels and one absmax a,

    Ŵ = a · NF4[i],        4 + 32/B = 4.5 bits per weight,

and with *double quantization* the absmaxes themselves stored as int8 (blocks of 256, one float32 factor each):
4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight, against 32 in float32 (7.75× smaller) or 16 in bfloat16.

**Dequantize on the fly.** :class:`NF4Linear` keeps only the codes and scales; each forward rebuilds Ŵ and
computes y = x Ŵᵀ + b in x's dtype, as bitsandbytes' NF4 matmul does: memory shrinks, arithmetic does not.

**LoRA on top.** A LoRA wrapper (``lightlm.lora``) adds y += (α/r) · B A x with A, B trained in fp32 while Ŵ
stays frozen: gradients flow *through* Ŵ to x, never into it. An NF4Linear is a LoRA base: it has integer
``in_features``/``out_features``, a forward, :meth:`NF4Linear.dequantized_weight` and :meth:`NF4Linear.set_weight`.

**Merging rounds.** Merging the update gives W' = Ŵ + ΔW (ΔW = (α/r) B A), but stored in NF4 again it becomes
Q(Ŵ + ΔW) ≠ Ŵ + ΔW: an update smaller than the gaps between levels is rounded away, and one that moves a
block's absmax (the largest of its perturbed ±a entries) rescales the whole block, so a small random ΔW can cost
more than it is worth (‖Q(W') − W'‖ > ‖ΔW‖). :func:`merge_rounding` measures ‖Q(Ŵ + ΔW) − (Ŵ + ΔW)‖ / ‖ΔW‖
without changing the layer; QLoRA keeps the adapter separate, or merges into a 16-bit copy of the base.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_bool, check_int, check_module, check_module_names, check_tensor, names_module
from .quant_formats import nf4_dequantize, nf4_quantize

__all__ = ["SCALER_BLOCK", "NF4Linear", "quantize_nf4", "merge_rounding"]

SCALER_BLOCK = 256  # absmaxes per float32 factor in double quantization (QLoRA's and torchao's choice)


class NF4Linear(nn.Module):
    """An nn.Linear whose weight is stored as NF4 (see the module docstring); build it with :meth:`from_linear`.

    Buffers: ``codes`` (uint8, in·out/2: two 4-bit indices per byte, the first in the high nibble) and either
    ``absmax`` (float32, one per block) or, with ``double_quant``, ``absmax_q`` (int8, one per block),
    ``absmax_factor`` (float32, one per 256 blocks) and ``absmax_mean`` (float32 scalar). ``bias`` is a frozen
    float Parameter (as in bitsandbytes' Linear4bit), or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, block_size: int = 64,
                 double_quant: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, min=1)
        self.out_features = check_int("out_features", out_features, min=1)
        self.block_size = check_int("block_size", block_size, min=2)
        self.double_quant = check_bool("double_quant", double_quant)
        numel = in_features * out_features
        if block_size % 2 or numel % block_size:
            raise ValueError(f"block_size={block_size} must be even and divide the {numel} weights "
                             f"({out_features}×{in_features}): a block may not be cut")
        blocks = numel // block_size
        self.register_buffer("codes", torch.zeros(numel // 2, dtype=torch.uint8, device=device))
        absmax = torch.ones(blocks, device=device) if not double_quant else None
        self.register_buffer("absmax", absmax)
        self.register_buffer("absmax_q", torch.zeros(blocks, dtype=torch.int8, device=device) if double_quant
                             else None)
        self.register_buffer("absmax_factor", torch.ones(-(-blocks // SCALER_BLOCK), device=device) if double_quant
                             else None)
        self.register_buffer("absmax_mean", torch.ones((), device=device) if double_quant else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if check_bool("bias", bias) else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> "NF4Linear":
        """Quantize an nn.Linear's weight to NF4 (its bias kept in float, frozen), on the weight's device."""
        if not isinstance(check_module("linear", linear), nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size=block_size,
                     double_quant=double_quant, device=weight.device,
                     dtype=weight.dtype if linear.bias is None else linear.bias.dtype)
        module.set_weight(weight)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def _nf4(self) -> dict:
        """The buffers as the dict :func:`lightlm.quant_formats.nf4_dequantize` reads (float32 weight)."""
        q = {"codes": self.codes, "shape": (self.out_features, self.in_features), "dtype": torch.float32,
             "block_size": self.block_size}
        if not self.double_quant:
            return {**q, "absmax": self.absmax}
        return {**q, "absmax_q": self.absmax_q, "absmax_factor": self.absmax_factor, "absmax_mean": self.absmax_mean,
                "scaler_block_size": SCALER_BLOCK}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ = a · NF4[i] (out, in), computed in float32 on the buffers' device, returned in ``dtype``."""
        return nf4_dequantize(self._nf4()).to(dtype)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize a new float weight (out, in) into the buffers, in place (same block size and double
        quantization; the buffers keep their device). Used to merge a LoRA update: set_weight(Ŵ + ΔW)."""
        weight = check_tensor("weight", weight, kind="float", ndim=2)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape ({self.out_features}, {self.in_features}) (out, in), got "
                             f"{tuple(weight.shape)}")
        q = nf4_quantize(weight.detach().to(self.codes.device), self.block_size, self.double_quant, SCALER_BLOCK)
        for name in ("codes", "absmax", "absmax_q", "absmax_factor", "absmax_mean"):
            if name in q:
                getattr(self, name).copy_(q[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x Ŵᵀ + b in x's dtype, Ŵ dequantized for this call only."""
        check_tensor("x", x, kind="float", min_ndim=1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has width {x.shape[-1]}, this layer takes in_features={self.in_features}")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def nbytes(self) -> int:
        """The bytes stored: codes, scales (and their factors and mean) and the bias."""
        tensors = [*self.buffers(), *([] if self.bias is None else [self.bias])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        """The layer's shape and NF4 settings, shown by ``print(model)``."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")


def quantize_nf4(model: nn.Module, skip: Iterable[str] = ("lm_head", "classifier"), block_size: int = 64,
                 double_quant: bool = True) -> dict:
    """Replace every nn.Linear of the model by an :class:`NF4Linear` in place, except those ``skip`` names
    (exactly or as a dotted suffix; an entry that matches nothing is allowed, so one default serves BERT
    classifiers and causal LMs). Every layer is checked before any is replaced: a Linear whose weight count is
    not a multiple of ``block_size`` is a ValueError naming it.

    Returns:
        ``{"quantized": [names], "bytes_before": int, "bytes_after": int}``: the bytes of the replaced layers'
        weights and biases before, and of their NF4 storage (:meth:`NF4Linear.nbytes`) after.
    """
    if isinstance(check_module("model", model), nn.Linear):
        raise TypeError("model is itself an nn.Linear: quantize it with NF4Linear.from_linear")
    skip = check_module_names("skip", skip, allow_empty=True)
    block_size = check_int("block_size", block_size, min=2)
    double_quant = check_bool("double_quant", double_quant)
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit codes per byte), got {block_size}")
    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
               and not any(names_module(name, s) for s in skip)]
    if not targets:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Linear to quantize outside skip={skip}")
    for name in targets:
        weight = model.get_submodule(name).weight
        if weight.numel() % block_size:
            raise ValueError(f"{name} has {weight.numel()} weights {tuple(weight.shape)}, not a multiple of "
                             f"block_size={block_size}: a block may not be cut; add it to skip")
        if not torch.isfinite(weight).all():
            raise ValueError(f"the weight of {name} has NaN or inf entries: it cannot be quantized")
    before = after = 0
    for name in targets:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, child)
        before += sum(p.numel() * p.element_size() for p in linear.parameters())
        quantized = NF4Linear.from_linear(linear, block_size, double_quant)
        after += quantized.nbytes()
        setattr(owner, child, quantized)
    return {"quantized": targets, "bytes_before": before, "bytes_after": after}


def merge_rounding(layer: NF4Linear, delta: torch.Tensor) -> dict:
    """What merging the update ΔW into an NF4 base would cost, without changing the layer:

        W' = Ŵ + ΔW,   relative_error = ‖Q(W') − W'‖_F / ‖ΔW‖_F,   max_abs = max |Q(W') − W'|,

    Q the NF4 round trip with the layer's own block size and double quantization (norms in float64).
    A relative error near 1 means the merge loses about as much as the update is worth.
    """
    if not isinstance(check_module("layer", layer), NF4Linear):
        raise TypeError(f"layer must be an NF4Linear (the base of a LoRA layer), got {type(layer).__name__}")
    delta = check_tensor("delta", delta, kind="float", ndim=2)
    if tuple(delta.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"delta must have the layer's weight shape ({layer.out_features}, {layer.in_features}), "
                         f"got {tuple(delta.shape)}")
    if not torch.isfinite(delta).all():
        raise ValueError("delta must be finite (no NaN or inf)")
    delta = delta.detach().to(device=layer.codes.device, dtype=torch.float32)
    if not delta.any():
        raise ValueError("delta is all zeros: the relative error ‖Q(Ŵ + ΔW) − (Ŵ + ΔW)‖ / ‖ΔW‖ is undefined")
    merged = layer.dequantized_weight() + delta                                     # W' = Ŵ + ΔW (float32)
    requantized = nf4_dequantize(nf4_quantize(merged, layer.block_size, layer.double_quant, SCALER_BLOCK))
    error = requantized.double() - merged.double()                                  # Q(W') − W'
    return {"relative_error": (error.norm() / delta.double().norm()).item(), "max_abs": error.abs().max().item()}
