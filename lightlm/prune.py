"""Pruning (剪枝), chapter 9: magnitude masks, torch-style reparametrisation, the cubic schedule, N:M masks,
sparsity reports and sensitivity scans. Activation-aware criteria (Wanda, SparseGPT) live in
:mod:`lightlm.prune_calib`; structured pruning of Hugging Face models (heads, neurons, layers) in
:mod:`lightlm.prune_structured`.

Conventions, everywhere in these three modules:

* A mask is a bool tensor of the weight's shape, **True = kept** (torch's ``weight_mask`` holds 1 = kept).
* ``sparsity`` s is the fraction of entries set to zero, in [0, 1); a tensor of n entries loses exactly
  ``round(s·n)`` of them, with Python's ``round`` (half to even: 0.5 of 5 entries prunes 2), the convention of
  ``torch.nn.utils.prune.l1_unstructured``.
* Ties are broken deterministically: scores are ranked with a *stable* ascending sort of the flattened tensor, so
  among equal scores the entry with the lower flat (row-major) index is pruned first. torch's ``l1_unstructured``
  prunes exactly k entries too but leaves which of several ties unspecified (``torch.topk``); some course code
  prunes every entry equal to the threshold (more than k zeros); Wanda's code sorts stably per row but prunes
  ``int(cols·s)`` (floor); SparseGPT's magnitude baseline prunes ``int(n·s) + 1``.
* An N:M mask keeps N entries in every group of M consecutive weights along the input (last) dimension, the
  NVIDIA 2:4 convention; Wanda's and SparseGPT's code pass the number *pruned* per group (the same at 2:4).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ._checks import check_callable, check_int, check_module, check_real, check_tensor

__all__ = ["n_pruned", "lowest_mask", "magnitude_mask", "row_mask", "global_magnitude_masks", "nm_mask",
           "apply_mask", "remove", "is_pruned", "magnitude_prune", "cubic_sparsity", "sparsity_report",
           "sensitivity_scan"]


# --------------------------------------------------------------------------- masks


def _check_sparsity(sparsity) -> float:
    return check_real("sparsity", sparsity, min=0, max=1, max_open=True)


def _check_scores(name: str, scores) -> torch.Tensor:
    check_tensor(name, scores, kind="float")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} must be finite (no NaN or inf): a mask cannot rank them")
    return scores


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` entries a sparsity removes: ``round(sparsity · numel)`` (torch.nn.utils.prune's rule)."""
    return round(_check_sparsity(sparsity) * check_int("numel", numel, min=0))


def lowest_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask (True = kept) that prunes the ``k`` lowest scores of the whole tensor (stable ties: lowest flat
    index first). The building block of every unstructured mask here."""
    _check_scores("scores", scores)
    k = check_int("k", k, min=0, max=scores.numel())
    flat = scores.flatten()
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=scores.device)
    if k:  # a stable argsort's first k, in O(n): all below the k-th value, then ties by lowest flat index
        threshold = flat.kthvalue(k).values
        below = flat < threshold
        keep[below] = False
        keep[torch.nonzero(flat == threshold).flatten()[:k - int(below.sum())]] = False
    return keep.view(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured magnitude mask of one tensor: the ``round(s·n)`` smallest ``|w|`` are pruned (True = kept).

    Equal to ``torch.nn.utils.prune.l1_unstructured``'s mask wherever |w| has no ties among the pruned boundary;
    ties go to the lower flat index (see the module docstring).
    """
    check_tensor("weight", weight, kind="float")
    return lowest_mask(weight.detach().abs(), n_pruned(weight.numel(), sparsity))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row mask: in every row (last dim = inputs) the ``round(s·cols)`` lowest scores are pruned, stable ties.

    Comparing within an output row is what Wanda does (chapter 9); a per-tensor mask can empty some rows."""
    _check_scores("scores", scores)
    if scores.ndim < 1:
        raise ValueError("scores must have at least one dimension (rows × inputs)")
    k = n_pruned(scores.shape[-1], sparsity)
    order = torch.argsort(scores, dim=-1, stable=True)[..., :k]
    return torch.ones_like(scores, dtype=torch.bool).scatter(-1, order, False)


def global_magnitude_masks(named_weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                           sparsity: float) -> dict[str, torch.Tensor]:
    """One magnitude threshold across several tensors (as ``prune.global_unstructured`` with ``L1Unstructured``).

    ``round(s·N)`` of all N entries are pruned, wherever they are, so layers end with different sparsities. Ties
    go to the earlier tensor (in the given order), then the lower flat index. Returns ``{name: keep-mask}``.
    """
    items = list(named_weights.items() if isinstance(named_weights, Mapping) else named_weights)
    if not items:
        raise ValueError("named_weights is empty: give at least one (name, tensor) pair")
    for name, weight in items:
        check_tensor(f"named_weights[{name!r}]", weight, kind="float")
    flat = torch.cat([w.detach().abs().flatten() for _, w in items])
    keep = lowest_mask(flat, n_pruned(flat.numel(), sparsity))
    sizes = [w.numel() for _, w in items]
    return {name: part.view(w.shape) for (name, w), part in zip(items, keep.split(sizes))}


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured mask: in every group of ``m`` consecutive entries along the last (input) dimension the
    ``n`` highest scores are kept, the ``m − n`` lowest pruned (stable ties). 2:4 keeps half."""
    _check_scores("scores", scores)
    m = check_int("m", m, min=1)
    n = check_int("n", n, min=1)
    if n > m:
        raise ValueError(f"n must be <= m (keep n of every m weights), got n={n}, m={m}")
    if scores.ndim < 1 or scores.shape[-1] % m:
        raise ValueError(f"the last dimension of scores ({tuple(scores.shape)}) must be a multiple of m={m}")
    groups = scores.reshape(*scores.shape[:-1], -1, m)
    order = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]
    return torch.ones_like(groups, dtype=torch.bool).scatter(-1, order, False).view(scores.shape)


# --------------------------------------------------------------------------- reparametrisation (torch's layout)


class _ApplyMask:
    """Forward pre-hook: recompute ``module.<name> = <name>_orig * <name>_mask`` before every forward."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module: nn.Module, inputs) -> None:
        setattr(module, self.name, getattr(module, self.name + "_orig") * getattr(module, self.name + "_mask"))


def _hook_of(module: nn.Module, name: str):
    return next(((k, h) for k, h in module._forward_pre_hooks.items()
                 if isinstance(h, _ApplyMask) and h.name == name), (None, None))


def is_pruned(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is reparametrised by :func:`apply_mask` (has ``<name>_orig`` and a mask hook)."""
    return _hook_of(check_module("module", module), name)[1] is not None


def apply_mask(module: nn.Module, name: str, mask: torch.Tensor) -> nn.Module:
    """Reparametrise ``module.<name>`` as torch.nn.utils.prune does: the parameter moves to ``<name>_orig``, the
    mask (1 = kept, the parameter's dtype) becomes the buffer ``<name>_mask``, and a forward pre-hook sets
    ``module.<name> = <name>_orig * <name>_mask``. The optimizer updates ``<name>_orig``; the gradient is zero
    where the mask is, so pruned weights stay zero through training. Applying a second mask multiplies the two.
    :func:`remove` makes it permanent. Returns the module."""
    check_module("module", module)
    check_tensor("mask", mask)
    if is_pruned(module, name):
        orig = getattr(module, name + "_orig")
    else:
        orig = getattr(module, name, None)
        if not isinstance(orig, nn.Parameter):
            raise ValueError(f"{type(module).__name__} has no parameter {name!r}; "
                             f"its parameters: {[n for n, _ in module.named_parameters(recurse=False)]}")
    if mask.shape != orig.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal {name}'s shape {tuple(orig.shape)}")
    mask = mask.to(device=orig.device, dtype=orig.dtype)
    if is_pruned(module, name):
        getattr(module, name + "_mask").mul_(mask)
    else:
        del module._parameters[name]
        module.register_parameter(name + "_orig", orig)
        module.register_buffer(name + "_mask", mask.clone())
        module.register_forward_pre_hook(_ApplyMask(name))
    _ApplyMask(name)(module, ())
    return module


def remove(module: nn.Module, name: str = "weight") -> nn.Module:
    """Make a mask permanent: ``<name>`` becomes a plain parameter equal to ``orig * mask`` again; the hook,
    ``<name>_orig`` and ``<name>_mask`` go (as ``torch.nn.utils.prune.remove``). Returns the module."""
    key, _ = _hook_of(check_module("module", module), name)
    if key is None:
        raise ValueError(f"{type(module).__name__}.{name} is not pruned (no mask hook); nothing to remove")
    with torch.no_grad():
        weight = getattr(module, name + "_orig") * getattr(module, name + "_mask")
    del module._forward_pre_hooks[key]
    delattr(module, name)
    del module._parameters[name + "_orig"]
    del module._buffers[name + "_mask"]
    module.register_parameter(name, nn.Parameter(weight))
    return module


def magnitude_prune(module: nn.Module, name: str = "weight", sparsity: float = 0.5, *,
                    relative: bool = False) -> torch.Tensor:
    """Prune ``module.<name>`` by magnitude through :func:`apply_mask`; returns the resulting keep-mask.

    Cumulative by default: ``sparsity`` is the fraction of the WHOLE tensor that is zero afterwards (a schedule's
    value), and a call may only raise it. With ``relative=True`` it is torch's ``amount``: a fraction of the
    entries still unpruned, so two calls of 0.2 leave 1 − 0.8² = 0.36 of the tensor pruned.
    """
    check_module("module", module)
    sparsity = _check_sparsity(sparsity)
    current = getattr(module, name + "_mask").bool() if is_pruned(module, name) else None
    weight = getattr(module, name + "_orig") if current is not None else getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor {name!r}")
    numel = weight.numel()
    already = 0 if current is None else numel - int(current.sum())
    k = already + n_pruned(numel - already, sparsity) if relative else n_pruned(numel, sparsity)
    if k < already:
        raise ValueError(f"sparsity {sparsity} is below the {already / numel:.4f} already pruned; a cumulative "
                         "schedule only grows the mask (use relative=True for torch's fractions of the rest)")
    scores = weight.detach().abs()
    if current is not None:  # pruned entries rank first (−1 < any |w|), so the old mask is kept
        scores = torch.where(current, scores, torch.full_like(scores, -1.0))
    mask = lowest_mask(scores, k)
    apply_mask(module, name, mask)
    return mask


# --------------------------------------------------------------------------- schedule


def cubic_sparsity(step: int, initial: float = 0.0, final: float = 0.5, start: int = 0, n_steps: int = 10,
                   interval: int = 1) -> float:
    """Zhu & Gupta's gradual-pruning schedule (chapter 9): s_t = s_f + (s_0 − s_f)(1 − (t − t_0)/(nΔt))³,
    clamped to [s_0, s_f] — the formula of ``torch.ao.pruning.scheduler.CubicSL`` (``init_sl``, ``init_t``,
    ``total_t`` = n_steps, ``delta_t`` = interval). Before ``start`` it returns ``initial``, after
    ``start + n_steps·interval`` it returns ``final``; pruning mostly early, when there is most redundancy.
    The paper updates masks only every ``interval`` steps: call this at those steps."""
    step = check_int("step", step)
    initial = _check_sparsity(initial)
    final = _check_sparsity(final)
    if initial > final:
        raise ValueError(f"initial sparsity must be <= final, got initial={initial}, final={final}")
    start = check_int("start", start)
    n_steps = check_int("n_steps", n_steps, min=1)
    interval = check_int("interval", interval, min=1)
    s = final + (initial - final) * (1.0 - (step - start) / (n_steps * interval)) ** 3
    return max(initial, min(final, s))


# --------------------------------------------------------------------------- reports and scans


def _linear_weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """``{module name: effective weight}`` of the named modules (default: every nn.Linear)."""
    check_module("model", model)
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, mod in modules.items() if isinstance(mod, nn.Linear)]
    found = {}
    for name in names:
        if name not in modules:
            raise ValueError(f"unknown module name {name!r}; e.g. {list(modules)[1:6]}")
        weight = getattr(modules[name], "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"module {name!r} ({type(modules[name]).__name__}) has no weight tensor")
        found[name] = weight
    return found


def sparsity_report(model: nn.Module, names: Iterable[str] | None = None) -> list[dict]:
    """Zeros per weight: ``[{"name", "params", "zeros", "sparsity"}, ..., {"name": "total", ...}]`` for the named
    modules (default every nn.Linear; a masked module counts its effective weight ``orig * mask``)."""
    rows = []
    for name, weight in _linear_weights(model, names).items():
        zeros = int((weight == 0).sum())
        rows.append({"name": name, "params": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()})
    params, zeros = sum(r["params"] for r in rows), sum(r["zeros"] for r in rows)
    rows.append({"name": "total", "params": params, "zeros": zeros, "sparsity": zeros / max(params, 1)})
    return rows


def sensitivity_scan(model: nn.Module, names: Iterable[str], sparsities: Iterable[float],
                     evaluate: Callable[[nn.Module], float],
                     mask_fn: Callable[[torch.Tensor, float], torch.Tensor] = magnitude_mask) -> dict[str, list]:
    """Prune one layer at a time and measure: for each module name and sparsity, zero that module's weight with
    ``mask_fn(weight, s)``, call ``evaluate(model)``, then restore the weight exactly. Returns
    ``{name: [evaluate at each sparsity]}``; the dense baseline is ``evaluate(model)`` itself."""
    weights = _linear_weights(model, list(names))
    sparsities = [_check_sparsity(s) for s in sparsities]
    check_callable("evaluate", evaluate)
    check_callable("mask_fn", mask_fn)
    results = {}
    for name, weight in weights.items():
        if not isinstance(weight, nn.Parameter):
            raise ValueError(f"{name} is masked already (apply_mask); remove() it before a sensitivity scan")
        saved = weight.detach().clone()
        results[name] = []
        try:
            for s in sparsities:
                with torch.no_grad():
                    weight.mul_(mask_fn(weight, s).to(weight.dtype))
                results[name].append(float(evaluate(model)))
                with torch.no_grad():
                    weight.copy_(saved)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
    return results
