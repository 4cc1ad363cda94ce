"""LoRA, low-rank adaptation (Hu et al. 2021), chapter 12: train a small update beside a frozen weight.

**The update.** A frozen Linear computes h = W₀ x (W₀ is d_out × d_in). LoRA adds a product of two thin matrices,

    h = W₀ x + s · B A x,     A: r × d_in,  B: d_out × r,  r ≪ min(d_in, d_out),

with s = α / r (α is ``lora_alpha``), or s = α / √r with rank-stabilised LoRA (rsLoRA, Kalajdzievski 2023), which
keeps the update's size steady as r grows. Only A and B train: r · (d_in + d_out) parameters per matrix instead
of d_in · d_out (r = 8 on a 384 × 384 projection: 6,144 instead of 147,456).

**The initialisation** is PEFT's: A ~ kaiming_uniform(a = √5), uniform on [−1/√d_in, 1/√d_in] (gain · √(3/fan_in)
with gain = √(2 / (1 + a²)) = 1/√3), and B = 0. Then BA = 0: at step 0 the wrapped model is the base model, yet
the gradient flows, into B first (∂L/∂B = s · g (A x)ᵀ, while ∂L/∂A = s · Bᵀ g xᵀ = 0).

**Merging.** After training W = W₀ + s · B A is one ordinary weight: no extra matmul at inference. ``merge`` adds
the update in place, ``unmerge`` subtracts it (W₀ back up to rounding). A quantized base (``dequantized_weight()``/
``set_weight(w)``, e.g. ``lightlm.qlora.NF4Linear``) merges by re-quantizing W₀ + s·BA: it rounds, irreversibly.

Layout and dtypes follow PEFT 0.21.2, so adapters move between the two (:mod:`lightlm.lora_io`): a GPT-2 ``Conv1D``
stores its weight (d_in, d_out) (``fan_in_fan_out``); A and B take the base's float dtype, fp16/bf16 upcast to fp32
(``autocast_adapter_dtype``); the LoRA path casts x to their dtype and the sum to the base output's.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch
from torch import nn

from ._checks import check_bool, check_int, check_module, check_real, names_module

__all__ = ["LoRALinear", "add_lora", "lora_layers", "merge_lora", "unmerge_lora", "remove_lora", "lora_settings",
           "matching_names", "lora_param_count"]


def lora_param_count(d_in: int, d_out: int, r: int, n_matrices: int = 1) -> int:
    """Trainable parameters LoRA adds: ``n_matrices · r · (d_in + d_out)`` (A is r×d_in, B is d_out×r)."""
    for name, value in (("d_in", d_in), ("d_out", d_out), ("r", r), ("n_matrices", n_matrices)):
        check_int(name, value, min=1)
    if r > min(d_in, d_out):
        raise ValueError(f"rank r={r} exceeds min(d_in, d_out)={min(d_in, d_out)}: the update would not be low-rank")
    return n_matrices * r * (d_in + d_out)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 layer, found without importing transformers


def _has_features(module: nn.Module) -> bool:
    return all(type(getattr(module, name, None)) is int for name in ("in_features", "out_features"))


def _is_quantized(module: nn.Module) -> bool:
    """A quantized linear lightlm merges into: in/out_features, ``dequantized_weight()`` and ``set_weight(w)``."""
    return _has_features(module) and all(callable(getattr(module, name, None)) for name in ("dequantized_weight",
                                                                                          "set_weight"))


def _wrappable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module) or _is_quantized(module)


def _float_weight(base: nn.Module) -> torch.Tensor | None:  # what merge adds to in place; None: other bases
    weight = getattr(base, "weight", None) if isinstance(base, nn.Linear) or _is_conv1d(base) else None
    return weight if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None


class LoRALinear(nn.Module):
    """A frozen ``base`` plus the trainable update s · B A: forward(x) = base(x) + s · B A dropout(x).

    ``base``: an ``nn.Linear``, a transformers ``Conv1D`` (weight stored (d_in, d_out)) or any module with integer
    ``in_features``/``out_features`` (a quantized linear); its parameters are frozen. ``r``: the rank, 1 <= r <=
    min(in_features, out_features); ``alpha`` > 0: the scale is α/r (α/√r with ``rslora``); ``dropout``: p in
    [0, 1) for the LoRA path's input (an identity when 0).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__()
        check_module("base", base)
        if isinstance(base, LoRALinear):
            raise ValueError("base is already a LoRALinear (already wrapped); wrap its .base instead")
        if isinstance(base, nn.Linear) or _has_features(base):
            d_in, d_out = base.in_features, base.out_features
        elif _is_conv1d(base):
            d_in, d_out = base.weight.shape  # Conv1D stores (d_in, d_out)
        else:
            raise TypeError("base must be an nn.Linear, a transformers Conv1D or a module with integer in_features "
                            f"and out_features; got {type(base).__name__}")
        r = check_int("r", r, min=1)
        if r > min(d_in, d_out):
            raise ValueError(f"r must be <= min(in_features, out_features) = {min(d_in, d_out)}, got {r}")
        self.alpha = check_real("alpha", alpha, min=0, min_open=True)
        dropout = check_real("dropout", dropout, min=0, max=1, max_open=True)
        self.rslora = check_bool("rslora", rslora)
        self.r, self.in_features, self.out_features = r, int(d_in), int(d_out)
        self.scaling = self.alpha / math.sqrt(r) if rslora else self.alpha / r  # s = α/√r or α/r
        self.merged, self._rounded = False, False
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        tensors = [*base.parameters(), *base.buffers()]  # a Linear's or Conv1D's weight comes first
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # PEFT's autocast_adapter_dtype
        device = tensors[0].device if tensors else None
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)  # (r, d_in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # U(-1/√d_in, 1/√d_in)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: BA = 0, the start is the base model exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W₀ x (+ bias) + s · B A dropout(x); just the base once merged."""
        result = self.base(x)
        if self.merged:
            return result
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))) * self.scaling  # s·BAx
        return (result + update).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, (out, in) — transposed to (in, out) for a Conv1D base, as its weight is stored."""
        b, a = self.lora_B.weight, self.lora_A.weight
        wide = torch.promote_types(a.dtype, torch.float32)
        delta = ((b.to(wide) @ a.to(wide)) * self.scaling).to(a.dtype)  # (d_out, d_in)
        return delta.T if _is_conv1d(self.base) else delta

    def merge(self) -> None:
        """W₀ ← W₀ + s·BA in place (a quantized base: ``set_weight(dequantized_weight() + ΔW)``, which rounds)."""
        if self.merged:
            raise ValueError("this LoRA layer is already merged; unmerge() it first")
        weight = _float_weight(self.base)
        with torch.no_grad():
            if weight is not None:
                weight.add_(self.delta_weight())  # computed in the promoted dtype, stored in W₀'s (as PEFT)
            elif _is_quantized(self.base):
                dense = self.base.dequantized_weight()
                self.base.set_weight(dense + self.delta_weight().to(device=dense.device, dtype=dense.dtype))
                self._rounded = True
            else:
                raise TypeError(f"cannot merge into a {type(self.base).__name__}: merging needs a float nn.Linear or "
                                "Conv1D weight, or dequantized_weight() and set_weight(w) methods")
        self.merged = True

    def unmerge(self) -> None:
        """W₀ ← W₀ − s·BA: gives the original weight back, exactly up to floating-point rounding."""
        if not self.merged:
            raise ValueError("this LoRA layer is not merged; nothing to unmerge")
        if self._rounded:
            raise ValueError(f"cannot unmerge: merging into the quantized {type(self.base).__name__} re-quantized "
                             "W₀ + s·BA, which rounded it, so W₀ cannot be recovered")
        weight = _float_weight(self.base)
        weight.data.sub_(self.delta_weight().to(weight.dtype))  # as PEFT: W₀ − ΔW cast to W₀'s dtype
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:.4g}, rslora={self.rslora}, merged={self.merged}")


def _targets(name: str, targets: Any) -> str | list[str]:
    """A regex string, or a non-empty list/tuple of module names."""
    if isinstance(targets, str):
        return targets
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"{name} must be a regex string or a list of module names, got {type(targets).__name__}")
    if not targets:
        raise ValueError(f"{name} must name at least one module, got an empty {type(targets).__name__}")
    return list(targets)


def _matches(name: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a string is a regex for the whole name; a list entry t matches t and names ending in '.t'."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(names_module(name, target) for target in targets)


def matching_names(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the modules of ``model`` (not the model itself) that ``targets`` selects: a regex string must match
    the whole name; each name in a list matches a module called that or ending with '.' + it (as PEFT)."""
    check_module("model", model)
    targets = _targets("targets", targets)
    return [name for name, _ in model.named_modules() if name and _matches(name, targets)]


def _leaf_names(model: nn.Module) -> str:
    """The distinct last name parts of the model's Linear-like modules, in order: 'query, key, value, dense, ...'."""
    names = [name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _wrappable(module)]
    return ", ".join(dict.fromkeys(names)) or "(none)"


def add_lora(model: nn.Module, target_modules: str | Sequence[str], r: int = 8, alpha: float = 16,
             dropout: float = 0.0, rslora: bool = False, modules_to_save: Sequence[str] | None = None) -> dict:
    """Wrap the selected Linear/Conv1D/quantized-linear modules of ``model`` in :class:`LoRALinear`, in place.

    ``target_modules``: a regex matching the full module name, or a list of names matched as a dotted suffix
    (:func:`matching_names`); r, alpha, dropout, rslora as in :class:`LoRALinear`. Every parameter is frozen; then
    the LoRA matrices train, and the modules named in ``modules_to_save`` (e.g. a new head, ``["classifier"]``;
    same matching rule; never LoRA-wrapped, as in PEFT) train in full. The settings are recorded on the model.

    Returns ``{"wrapped": [names], "trainable": int, "total": int}``, counted as PEFT's
    ``get_nb_trainable_parameters()``: PEFT keeps a frozen copy of each module to save, so those count twice, and
    a 4-bit base (a module with a ``codes`` buffer) counts its in·out weights, as PEFT counts bitsandbytes' own.
    """
    check_module("model", model)
    targets = _targets("target_modules", target_modules)
    saves = [] if modules_to_save is None else _targets("modules_to_save", modules_to_save)
    if lora_layers(model):
        raise ValueError(f"model already has LoRA layers (already wrapped: {', '.join(lora_layers(model))}); "
                         "remove_lora(model) first")
    saved = [name for name, _ in model.named_modules() if name and saves and _matches(name, saves)]
    if missing := [target for target in saves if not any(_matches(name, [target]) for name in saved)]:
        raise ValueError(f"modules_to_save {missing} match no module of the model")
    saved = [name for name in saved if not any(name.startswith(outer + ".") for outer in saved)]  # outermost
    chosen = [(name, module) for name, module in model.named_modules() if name and _matches(name, targets)
              and _wrappable(module) and not any(name == s or name.startswith(s + ".") for s in saved)]
    if not chosen:
        raise ValueError(f"target_modules {target_modules!r} match no Linear, Conv1D or quantized linear of the "
                         f"model; its Linear leaf names are: {_leaf_names(model)}")
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:  # every layer is checked before the model changes
        wrappers = [LoRALinear(module, r, alpha, dropout, rslora) for _, module in chosen]
    except (TypeError, ValueError):
        [parameter.requires_grad_(flag) for parameter, flag in flags]
        raise
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for (name, _), wrapper in zip(chosen, wrappers):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper)
    for name in saved:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad_(True)
    model._lightlm_lora = {"target_modules": targets, "r": wrappers[0].r, "alpha": wrappers[0].alpha, "rslora": rslora,
                           "dropout": float(dropout), "modules_to_save": saves, "saved_modules": saved,
                           "fan_in_fan_out": any(_is_conv1d(module) for _, module in chosen)}
    copies = sum(p.numel() for name in saved for p in model.get_submodule(name).parameters())
    packed = sum(m.in_features * m.out_features for m in model.modules() if "codes" in m._buffers)  # 4-bit bases
    return {"wrapped": [name for name, _ in chosen], "trainable": sum(p.numel() * p.requires_grad for p in
            model.parameters()), "total": sum(p.numel() for p in model.parameters()) + copies + packed}


def lora_settings(model: nn.Module) -> dict:
    """The settings :func:`add_lora` recorded on ``model`` (a copy): target_modules, r, alpha, dropout, rslora,
    modules_to_save, saved_modules (their resolved names), fan_in_fan_out (a Conv1D was wrapped)."""
    check_module("model", model)
    settings = getattr(model, "_lightlm_lora", None)
    if settings is None:
        raise ValueError("model has no LoRA settings: call add_lora(model, ...) first")
    return dict(settings)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """``{name: LoRALinear}`` for every LoRA layer in ``model``, in module order."""
    check_module("model", model)
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def _layers_or_raise(model: nn.Module) -> dict[str, LoRALinear]:
    if not (layers := lora_layers(model)):
        raise ValueError("model has no LoRA layers: call add_lora(model, ...) first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer (W₀ ← W₀ + s·BA); returns the model."""
    for layer in _layers_or_raise(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Unmerge every LoRA layer (W₀ ← W₀ − s·BA); returns the model."""
    for layer in _layers_or_raise(model).values():
        layer.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by its base (PEFT's ``merge_and_unload``), in place; returns the model.

    With ``merge`` the update is merged first (a merged layer stays so); without, a merged layer is unmerged, so the
    base comes back as it was. The base parameters stay frozen (requires_grad False).
    """
    merge = check_bool("merge", merge)
    layers = _layers_or_raise(model)
    if "" in layers:
        raise ValueError("model is itself a LoRALinear: use its .base")
    for name, layer in layers.items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    model.__dict__.pop("_lightlm_lora", None)
    return model
