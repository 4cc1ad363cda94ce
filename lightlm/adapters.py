"""Parameter-efficient fine-tuning without LoRA, chapter 12: Houlsby adapters, BitFit and linear probing.

Each method freezes the pre-trained weights θ₀ and trains a small set φ (|φ| ≪ |θ₀|); what is saved per task is φ
alone (:func:`trainable_state_dict`).

**Houlsby adapters** (Houlsby et al. 2019). A bottleneck module on a width-d hidden state h:

    Adapter(h) = h + W_up · σ(W_down · h + b_down) + b_up,     W_down: d → m,  W_up: m → d,  m ≪ d,

with σ a nonlinearity (GELU) and a skip connection, so that with W ≈ 0 it is the identity: the weights start at
N(0, std²) with std = 10⁻³ and the biases at 0, and the pre-trained network is unchanged at step 0 (exactly so
with std = 0). Two adapters per Transformer layer: after the attention block's output projection and after the
feed-forward block's output projection, each *before* the residual add and the LayerNorm — in BERT, on the
outputs of ``attention.output.dense`` and ``output.dense`` (:class:`AdaptedOutput` wraps them; dropout, the
residual add and the LayerNorm follow, unchanged). Houlsby et al. also train the LayerNorms (and the new head).
Parameters per layer: 2 · (2dm + d + m); BERT-base (d = 768) with m = 64: 2 · 99,136 = 198,272 per layer.

**BitFit** (Ben Zaken et al. 2022): train only the bias terms b of every layer (and the new head):
W x + b with W frozen. A model without biases (Llama, SmolLM2) has nothing for BitFit to train.

**Linear probing / head-only**: train only the new classification head on frozen features
(:func:`freeze_except` with ``["classifier"]``); :func:`freeze_except` trains any named set of modules.

Module names follow PEFT's rule: a name ``t`` matches a module called ``t`` or ending in ``"." + t``.
:func:`trainable_report` prints PEFT's ``print_trainable_parameters`` line.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from ._checks import (check_bool, check_choice, check_int, check_module, check_module_names, check_real,
                      names_module)

__all__ = ["ACTIVATIONS", "Adapter", "AdaptedOutput", "add_adapters", "bitfit", "freeze_except",
           "trainable_parameters", "trainable_report", "trainable_state_dict"]

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


class Adapter(nn.Module):
    """Houlsby's bottleneck with a skip connection: h + up(σ(down(h))), near the identity at initialisation.

    Args:
        features: the width d of the hidden state; bottleneck: the width m of the bottleneck.
        activation: σ, one of ``"gelu"``, ``"relu"``, ``"tanh"``.
        init_std: the standard deviation of the N(0, std²) weights (drawn from torch's current random state);
            0 gives exactly the identity. Biases start at 0.
        device, dtype: where and in what dtype the weights live.
    """

    def __init__(self, features: int, bottleneck: int, activation: str = "gelu", init_std: float = 1e-3, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.features = check_int("features", features, min=1)
        self.bottleneck = check_int("bottleneck", bottleneck, min=1)
        self.activation_name = check_choice("activation", activation, tuple(ACTIVATIONS))
        init_std = check_real("init_std", init_std, min=0)
        self.down = nn.Linear(features, bottleneck, device=device, dtype=dtype)     # W_down: d → m
        self.act = ACTIVATIONS[activation]()                                        # σ
        self.up = nn.Linear(bottleneck, features, device=device, dtype=dtype)       # W_up: m → d
        with torch.no_grad():
            for linear in (self.down, self.up):
                linear.weight.normal_(0.0, init_std)                                # W ~ N(0, std²); std 0: W = 0
                linear.bias.zero_()                                                 # b = 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """h + W_up σ(W_down h + b_down) + b_up, for h of shape (..., features)."""
        if hidden.shape[-1] != self.features:
            raise ValueError(f"hidden has width {hidden.shape[-1]}, this adapter takes features={self.features}")
        return hidden + self.up(self.act(self.down(hidden)))                       # skip connection

    def extra_repr(self) -> str:
        """The widths d → m → d and the activation, shown by ``print(model)``."""
        return f"{self.features} -> {self.bottleneck} -> {self.features}, activation={self.activation_name}"


class AdaptedOutput(nn.Module):
    """A sublayer followed by an :class:`Adapter`: forward(*args) = adapter(base_layer(*args)).

    ``base_layer`` is the wrapped module (an ``nn.Linear``, or any module with an integer ``out_features``);
    the adapter takes its output width and, unless given, its parameters' device and dtype.
    """

    def __init__(self, base_layer: nn.Module, bottleneck: int, activation: str = "gelu",
                 init_std: float = 1e-3) -> None:
        super().__init__()
        check_module("base_layer", base_layer)
        if isinstance(base_layer, AdaptedOutput):
            raise ValueError("base_layer is already an AdaptedOutput: it has an adapter")
        features = getattr(base_layer, "out_features", None)
        if isinstance(features, bool) or not isinstance(features, int):
            raise TypeError(f"base_layer must have an integer out_features (an nn.Linear), got "
                            f"{type(base_layer).__name__}")
        reference = next(iter(base_layer.parameters()), None)
        reference = next(iter(base_layer.buffers()), None) if reference is None else reference
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
        self.base_layer = base_layer
        self.adapter = Adapter(features, bottleneck, activation, init_std,
                               device=None if reference is None else reference.device, dtype=dtype)

    def forward(self, *args, **kwargs):
        """adapter(base_layer(*args, **kwargs))."""
        return self.adapter(self.base_layer(*args, **kwargs))


def _patterns(names: Iterable[str]) -> str:
    """The distinct names with layer indices written N (``encoder.layer.N.output.dense``), for error messages."""
    return ", ".join(sorted({re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", name) for name in names if name}))


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _find(model: nn.Module, names: list[str], what: str) -> list[str]:
    """The module and parameter names that ``names`` match (dotted-suffix rule); a name that matches nothing
    is a ValueError listing the model's modules. Nothing is changed."""
    candidates = [name for name, _ in model.named_modules() if name] + [name for name, _ in model.named_parameters()]
    matched = []
    for target in names:
        found = [name for name in candidates if names_module(name, target)]
        if not found:
            raise ValueError(f"{what} entry {target!r} names no module or parameter of {type(model).__name__}; "
                             f"its modules are: {_patterns(name for name, _ in model.named_modules())}")
        matched += [name for name in found if name not in matched]
    return matched


def _parameters(model: nn.Module, matched: list[str]) -> list[nn.Parameter]:
    """The parameters of the matched modules, and the matched parameters."""
    modules, parameters = dict(model.named_modules()), dict(model.named_parameters())
    return [p for name in matched for p in (modules[name].parameters() if name in modules else [parameters[name]])]


def _summary(model: nn.Module, **extra) -> dict:
    trainable, total = trainable_parameters(model)
    return {**extra, "trainable": trainable, "total": total}


def add_adapters(model: nn.Module, bottleneck: int, target_modules: Iterable[str] = ("attention.output.dense",
                 "output.dense"), train_layernorm: bool = True, modules_to_save: Iterable[str] | None = None,
                 activation: str = "gelu", init_std: float = 1e-3) -> dict:
    """Insert Houlsby adapters in place: every module whose name matches a target (PEFT's dotted-suffix rule) is
    wrapped in an :class:`AdaptedOutput`, once, even where several targets match it (``"output.dense"`` matches
    ``attention.output.dense`` too: BERT's default gives exactly two adapters per layer). Then everything is
    frozen except the adapters, the norms (``nn.LayerNorm`` or a class named ``*LayerNorm``/``*RMSNorm``) if
    ``train_layernorm``, and the modules ``modules_to_save`` names (trained in place, e.g. ``["classifier"]``).

    Returns:
        ``{"wrapped": [names], "trainable": int, "total": int}``. No target matched: a ValueError listing the
        model's Linear names.
    """
    check_module("model", model)
    bottleneck = check_int("bottleneck", bottleneck, min=1)
    targets = check_module_names("target_modules", target_modules)
    train_layernorm = check_bool("train_layernorm", train_layernorm)
    check_choice("activation", activation, tuple(ACTIVATIONS))
    check_real("init_std", init_std, min=0)
    saved = [] if modules_to_save is None else _find(model, check_module_names("modules_to_save", modules_to_save),
                                                     "modules_to_save")
    saved = _parameters(model, saved)                                               # found before wrapping
    wrapped = [name for name, _ in model.named_modules() if name and any(names_module(name, t) for t in targets)]
    if not wrapped:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        raise ValueError(f"target_modules {targets} match no module of {type(model).__name__}; its Linears are: "
                         f"{_patterns(linears) or 'none'}")
    for name in wrapped:                                                            # check all before changing any
        module, inner = model.get_submodule(name), [n for n in wrapped if n.startswith(name + ".")]
        if isinstance(module, AdaptedOutput):
            raise ValueError(f"{name} already has an adapter (add_adapters was called twice)")
        if inner or not isinstance(getattr(module, "out_features", None), int):
            raise ValueError(f"target_modules match {name} ({type(module).__name__}), which is not a Linear "
                             f"(no integer out_features{', and contains ' + inner[0] if inner else ''}): name "
                             "the output projections, e.g. 'attention.output.dense' and 'output.dense' in BERT")
    model.requires_grad_(False)                                                     # freeze θ₀
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = AdaptedOutput(getattr(owner, child), bottleneck, activation, init_std)
        setattr(owner, child, layer)                                                # adapter parameters train
    if train_layernorm:
        for module in model.modules():
            if _is_norm(module):
                module.requires_grad_(True)
    for parameter in saved:
        parameter.requires_grad_(True)
    return _summary(model, wrapped=wrapped)


def bitfit(model: nn.Module, modules_to_save: Iterable[str] | None = None) -> dict:
    """BitFit: freeze every parameter except the biases (named ``bias`` or ``*.bias``) and the modules that
    ``modules_to_save`` names (e.g. ``["classifier"]``). A model without biases is a ValueError.

    Returns ``{"biases": [names], "trainable": int, "total": int}``.
    """
    check_module("model", model)
    saved = [] if modules_to_save is None else _find(model, check_module_names("modules_to_save", modules_to_save),
                                                     "modules_to_save")
    biases = [name for name, _ in model.named_parameters() if names_module(name, "bias")]
    if not biases:
        raise ValueError(f"{type(model).__name__} has no bias parameters, and BitFit trains only biases: use "
                         "LoRA (or adapters) for a model without biases such as Llama")
    model.requires_grad_(False)
    parameters = dict(model.named_parameters())
    for name in biases:
        parameters[name].requires_grad_(True)                                       # train b, keep W frozen
    for parameter in _parameters(model, saved):
        parameter.requires_grad_(True)
    return _summary(model, biases=biases)


def freeze_except(model: nn.Module, names: Iterable[str]) -> dict:
    """Freeze everything except the modules (dotted-suffix rule) or parameters (exact name or dotted suffix)
    that ``names`` match: ``freeze_except(model, ["classifier"])`` is linear probing. A name that matches
    nothing is a ValueError listing the model's modules.

    Returns ``{"matched": [names], "trainable": int, "total": int}``.
    """
    check_module("model", model)
    matched = _find(model, check_module_names("names", names), "names")  # check all before freezing
    model.requires_grad_(False)
    for parameter in _parameters(model, matched):
        parameter.requires_grad_(True)
    return _summary(model, matched=matched)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once (as PEFT's
    ``get_nb_trainable_parameters``). A quantized Linear (a module holding a ``codes`` buffer and integer
    ``in_features``/``out_features``, such as NF4Linear or QuantLinear) adds its in·out weights to the total, as
    PEFT counts bitsandbytes' 4-bit weights at their unpacked size; they are frozen by construction."""
    check_module("model", model)
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    for module in model.modules():
        if "codes" in dict(module.named_buffers(recurse=False)):
            sizes = (getattr(module, "in_features", None), getattr(module, "out_features", None))
            if all(isinstance(n, int) and not isinstance(n, bool) for n in sizes):
                total += sizes[0] * sizes[1]
    return trainable, total


def trainable_report(model: nn.Module) -> str:
    """PEFT 0.21.2's ``print_trainable_parameters`` line: ``trainable params: 1,234 || all params: 5,678 ||
    trainable%: 21.7330``."""
    trainable, total = trainable_parameters(model)
    if total == 0:
        raise ValueError(f"{type(model).__name__} has no parameters: there is no trainable fraction to report")
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only, by their ``state_dict`` names (detached, sharing storage): a method's weights
    φ, to save with ``safetensors.torch.save_file`` and load back with ``model.load_state_dict(d, strict=False)``."""
    check_module("model", model)
    return {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}
