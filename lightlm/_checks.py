"""Shared argument checks (private): one place for the type and range checks every module needs.

The convention, everywhere in lightlm: a value of the wrong TYPE raises ``TypeError``; a value of the right
type but outside what is allowed raises ``ValueError``. Each message names the argument, says what was given
and what is allowed, e.g. ``steps must be an int, got bool`` or ``steps must be >= 1, got 0``.

``bool`` is a subclass of ``int`` in Python, so ``True`` would pass a plain ``isinstance(x, int)``; these
checks reject it wherever a number is expected. Each check returns the value it accepted, so it can be used
inline: ``steps = check_int("steps", steps, min=1)``.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any, Collection

import torch

__all__ = ["check_int", "check_real", "check_bool", "check_choice", "check_tensor", "check_score_mask",
           "check_module", "check_callable", "is_integer_dtype"]


def _bound(name: str, value: Any, low: Any, high: Any, low_open: bool = False, high_open: bool = False) -> None:
    """ValueError if ``value`` is outside [low, high] (ends open where asked; None = unbounded)."""
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return
    if low is not None and high is not None:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    if too_low:
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")


def check_int(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:
    """An integer (``int`` or a NumPy integer; never ``bool``) in [min, max]; returns it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    _bound(name, int(value), min, max)
    return int(value)


def check_real(name: str, value: Any, *, min: float | None = None, max: float | None = None,
               min_open: bool = False, max_open: bool = False, finite: bool = True) -> float:
    """A real number (int, float, NumPy scalar; never ``bool``) in [min, max]; returns it as ``float``.

    ``min_open``/``max_open`` exclude the bound itself (``min=0, min_open=True`` means > 0). NaN is always
    refused; ±inf unless ``finite=False``.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")
    if finite and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    _bound(name, value, min, max, min_open, max_open)
    return value


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0/1, not a tensor)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def check_choice(name: str, value: Any, allowed: Collection[Any]) -> Any:
    """One of ``allowed`` (compared with ``==``); a ValueError lists them. Unhashable values are refused too."""
    try:
        ok = value in allowed
    except TypeError:  # e.g. a list looked up in a set
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """True for torch's integer dtypes (int8 ... int64, uint8 ...), False for float, complex and bool."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


_KINDS = {
    "float": ("a floating-point", lambda t: t.is_floating_point()),
    "int": ("an integer", lambda t: is_integer_dtype(t.dtype)),
    "bool": ("a bool", lambda t: t.dtype == torch.bool),
}


def check_tensor(name: str, value: Any, *, kind: str | None = None,
                 ndim: int | tuple[int, ...] | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """A ``torch.Tensor``, optionally of a dtype ``kind`` and a number of dimensions.

    Args:
        kind: ``"float"`` (any floating dtype), ``"int"`` (integer, not bool), ``"bool"`` or None (any);
            a wrong dtype is a TypeError.
        ndim: the allowed number(s) of dimensions; min_ndim: a lower bound. A wrong shape is a ValueError.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if kind is not None:
        description, test = _KINDS[kind]
        if not test(value):
            raise TypeError(f"{name} must be {description} tensor, got dtype {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            words = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name} must be {words}, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_score_mask(name: str, mask: Any, scores_shape: torch.Size, scores: torch.Tensor) -> torch.Tensor:
    """An attention mask as torch's SDPA takes it: bool (True = may attend) or float (added to the scores,
    in the dtype of ``scores``), on the scores' device, broadcastable to ``scores_shape`` (..., L, S)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = may attend) or float (added to the scores), got {mask.dtype}")
    if mask.is_floating_point() and mask.dtype != scores.dtype:
        raise TypeError(f"a float {name} must have the dtype of the scores ({scores.dtype}), got {mask.dtype}")
    if mask.device != scores.device:
        raise ValueError(f"{name} must be on the scores' device ({scores.device}), got {mask.device}")
    try:
        fits = torch.broadcast_shapes(mask.shape, scores_shape) == scores_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
                         f"{tuple(scores_shape)} (..., L queries, S keys)")
    return mask


def check_module(name: str, value: Any) -> torch.nn.Module:
    """A ``torch.nn.Module``."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def check_callable(name: str, value: Any) -> Any:
    """Something callable (a function, a lambda, a module)."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_module_names(name: str, value: Any, *, allow_empty: bool = False) -> list[str]:
    """A module name or an iterable of them (non-empty ``str``), as a list: anything else is a TypeError naming
    ``name``; an empty list is a ValueError unless ``allow_empty``."""
    if isinstance(value, str):
        value = [value]
    try:
        value = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a module name or a list of them, got {type(value).__name__}") from None
    for entry in value:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"{name} entries must be module names (non-empty str), got {entry!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must name at least one module")
    return value


def names_module(module_name: str, target: str) -> bool:
    """PEFT's matching rule: ``target`` names the module ``module_name`` itself or a dotted suffix of it
    (``"query"`` names ``bert.encoder.layer.0.attention.self.query``, not ``...self.key_query``)."""
    return module_name == target or module_name.endswith("." + target)
