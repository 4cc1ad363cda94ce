"""Re-parameterization (重参数化) and operator fusion (算子融合), chapter 9: rewriting weights so that a network
computes exactly the same function with fewer, or larger, operations.

**Folding a norm into the next Linear.** A LayerNorm outputs n(x) = γ ⊙ x̂ + β (x̂ the normalised x), and the
Linear that reads it computes W n(x) + b = (W diag γ) x̂ + (W β + b). So W' = W diag γ (column j times γ_j),
b' = b + W β, and the norm keeps γ = 1, β = 0. An RMSNorm has no β. The layer's function is unchanged only if
the norm's output goes to those Linears alone: in a pre-norm block (Llama: ``input_layernorm`` → q, k, v;
``post_attention_layernorm`` → gate, up). In BERT's post-norm blocks a LayerNorm's output is also the residual
stream of the next sub-layer (``attention.output.LayerNorm`` → ``intermediate.dense`` *and* the residual of
``output.LayerNorm``), so the fold keeps that Linear's output but changes the residual.

**Fusing Linears that read the same input.** [W_q; W_k; W_v] x + [b_q; b_k; b_v]: one matmul with Σ_k out_k rows
whose output is split afterwards — one larger GEMM instead of three kernel launches. :func:`unfuse_linear` splits
it back.

**Merging parallel branches** (RepVGG, Ding et al. 2021): Σ_k (W_k x + b_k) = (Σ_k W_k) x + Σ_k b_k; an identity
branch is W = I. (Merging a LoRA update, W + BA, is the same move.)

**Folding a residual scale.** In y = x + α·f(x) with f ending in a Linear (W, b), α(W h + b) = (αW) h + αb.

Folds work in place (the model keeps its modules and state-dict keys; a LayerNorm fold may give a bias-free
Linear a bias); fuse, unfuse and merge return new modules on the weights' device, in their dtype. Arithmetic
runs in float32 at least.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ._checks import check_int, check_module, check_real

__all__ = ["fold_norm_into_linear", "fuse_linears", "unfuse_linear", "merge_parallel_linears",
           "fold_residual_scale"]


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in float32 at least (float64 stays float64)."""
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


def _linears(name: str, linears, allow_identity: bool = False) -> list[nn.Module]:
    """One nn.Linear or an iterable of them (nn.Identity too where allowed): distinct, one device and dtype."""
    if isinstance(linears, nn.Module) and not isinstance(linears, nn.ModuleList):
        linears = [linears]
    items = list(_iterable(name, linears, "an nn.Linear or a list of them"))
    if not items:
        raise ValueError(f"{name} must hold at least one nn.Linear")
    allowed = (nn.Linear, nn.Identity) if allow_identity else nn.Linear
    for item in items:
        if not isinstance(item, allowed):
            kinds = "nn.Linear or nn.Identity" if allow_identity else "nn.Linear"
            raise TypeError(f"{name} must be {kinds} modules, got {type(item).__name__}")
    if len({id(item) for item in items}) != len(items):
        raise ValueError(f"{name} holds the same module twice")
    weights = [item.weight for item in items if isinstance(item, nn.Linear)]
    if not weights:
        raise ValueError(f"{name} must hold at least one nn.Linear (an identity alone has no shape)")
    if len({(w.device, w.dtype) for w in weights}) != 1:
        found = sorted({f"{w.device} {w.dtype}" for w in weights})
        raise ValueError(f"{name} must share one device and dtype, got {found}")
    return items


def _iterable(name: str, value, what: str) -> Iterable:
    """An iterable (not a string), else a TypeError: "{name} must be {what}, got ..."."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def _new_linear(d_in: int, d_out: int, weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor):
    """A new nn.Linear holding ``weight`` (and ``bias``), on ``like``'s device and in its dtype."""
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


# --------------------------------------------------------------------------- folds (in place)


@torch.no_grad()
def fold_norm_into_linear(norm: nn.Module, linear: nn.Linear | Sequence[nn.Linear]) -> None:
    """Fold a norm's γ (and β) into the Linear(s) that read its output, in place: W ← W diag γ, b ← b + W β; then
    γ ← 1, β ← 0. Give every Linear that reads the norm (q, k and v together): γ is reset once.

    ``norm``: nn.LayerNorm, nn.RMSNorm or transformers' ``LlamaRMSNorm`` — a module that multiplies by a 1-D
    ``weight`` (and adds an optional ``bias``). A norm computing (1 + γ) ⊙ x̂, as Gemma's, is not one. The
    model's output is unchanged only where the norm feeds these Linears alone (pre-norm; see the module note).
    """
    check_module("norm", norm)
    linears = _linears("linear", linear)
    gamma, beta = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if not isinstance(gamma, torch.Tensor) or gamma.ndim != 1:
        raise ValueError(f"norm ({type(norm).__name__}) has no 1-D weight γ to fold (is it elementwise_affine?)")
    width = linears[0].in_features
    if any(item.in_features != width for item in linears) or gamma.shape[0] != width:
        raise ValueError(f"norm has width {gamma.shape[0]}, the linears read {[m.in_features for m in linears]} "
                         "input features: they must all read the norm's output")
    if beta is not None and (not isinstance(beta, torch.Tensor) or beta.shape != gamma.shape):
        raise ValueError(f"norm's bias must be a tensor shaped like its weight {tuple(gamma.shape)}")
    for item in linears:
        w = _wide(item.weight)                                                 # W (out, in)
        if beta is not None and bool(beta.any()):
            shift = w @ _wide(beta)                                            # W β
            if item.bias is None:
                item.bias = nn.Parameter(torch.zeros_like(shift, dtype=item.weight.dtype))
            item.bias.copy_(_wide(item.bias) + shift)                          # b' = b + W β
        item.weight.copy_(w * _wide(gamma))                                    # W' = W diag γ: column j × γ_j
    gamma.fill_(1)                                                             # γ ← 1
    if beta is not None:
        beta.zero_()                                                           # β ← 0


@torch.no_grad()
def fold_residual_scale(linear: nn.Linear, alpha: float) -> None:
    """y = x + α·f(x) → y = x + f'(x), in place: f's last Linear becomes (αW, αb)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear (the last layer of the residual branch), got "
                        f"{type(linear).__name__}")
    alpha = check_real("alpha", alpha)
    linear.weight.copy_(_wide(linear.weight) * alpha)                          # αW
    if linear.bias is not None:
        linear.bias.copy_(_wide(linear.bias) * alpha)                          # αb


# --------------------------------------------------------------------------- fusions (new modules)


def fuse_linears(linears: Sequence[nn.Linear]) -> nn.Linear:
    """One Linear computing all of ``linears`` (same input width) at once: rows [W_1; W_2; …], bias [b_1; b_2; …]
    (zeros for a Linear without bias; no bias if none has one). Split its output with
    ``y.split([m.out_features for m in linears], dim=-1)``."""
    linears = _linears("linears", linears)
    widths = {item.in_features for item in linears}
    if len(widths) != 1:
        raise ValueError(f"the linears must read the same input, but their in_features differ: {sorted(widths)}")
    like = linears[0].weight
    weight = torch.cat([item.weight.detach() for item in linears])             # [W_1; W_2; …]  (Σ out_k, in)
    bias = None
    if any(item.bias is not None for item in linears):
        bias = torch.cat([item.bias.detach() if item.bias is not None else like.new_zeros(item.out_features)
                          for item in linears])                                # [b_1; b_2; …]
    return _new_linear(widths.pop(), weight.shape[0], weight, bias, like)


def unfuse_linear(fused: nn.Linear, sizes: Sequence[int]) -> list[nn.Linear]:
    """Split a fused Linear back into Linears of ``sizes`` output rows each (they must add up to out_features);
    each part has a bias if the fused Linear has one."""
    if not isinstance(fused, nn.Linear):
        raise TypeError(f"fused must be an nn.Linear, got {type(fused).__name__}")
    sizes = [check_int("sizes[i]", size, min=1) for size in _iterable("sizes", sizes, "a list of ints")]
    if sum(sizes) != fused.out_features:
        raise ValueError(f"sizes must add up to fused.out_features = {fused.out_features}, got {sizes} "
                         f"(sum {sum(sizes)})")
    weights = fused.weight.detach().split(sizes)
    biases = fused.bias.detach().split(sizes) if fused.bias is not None else [None] * len(sizes)
    return [_new_linear(fused.in_features, size, w, b, fused.weight) for size, w, b in zip(sizes, weights, biases)]


def merge_parallel_linears(linears: Sequence[nn.Module]) -> nn.Linear:
    """One Linear for parallel branches whose outputs are added, y = Σ_k (W_k x + b_k): W = Σ W_k, b = Σ b_k
    (RepVGG). Branches: nn.Linear of one shape, or nn.Identity (W = I, when in = out)."""
    linears = _linears("linears", linears, allow_identity=True)
    real = [item for item in linears if isinstance(item, nn.Linear)]
    shapes = {tuple(item.weight.shape) for item in real}
    if len(shapes) != 1:
        raise ValueError(f"parallel branches must share one (out, in) shape, got {sorted(shapes)}")
    (d_out, d_in), like = shapes.pop(), real[0].weight
    if len(real) < len(linears) and d_in != d_out:
        raise ValueError(f"an identity branch needs in = out, but the Linears are {d_out} x {d_in}")
    weight = sum(_wide(item.weight) for item in real)                         # Σ_k W_k
    if len(real) < len(linears):
        weight = weight + (len(linears) - len(real)) * torch.eye(d_in, dtype=weight.dtype, device=weight.device)  # + I
    biases = [_wide(item.bias) for item in real if item.bias is not None]
    bias = sum(biases) if biases else None                                    # Σ_k b_k
    return _new_linear(d_in, d_out, weight, bias, like)
