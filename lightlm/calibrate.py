"""Calibration (校准): collecting what the Linears of a model see on a few batches, one group at a time.

Activation-aware pruning (Wanda, SparseGPT; chapter 9) and quantization (GPTQ; chapter 10) both need, for each
nn.Linear computing y = x Wᵀ, a statistic of its calibration inputs X (tokens, in): the squared column norms
‖X_j‖² or the Gram matrix XᵀX. Compressing one Linear changes what the Linears after it see, so the reference
methods calibrate *sequentially*: a group of Linears that read the same input (a Llama block gives [q, k, v],
[o], [gate, up], [down]) is calibrated on the outputs of the groups already compressed before it.
:func:`calibrate_sequential` runs that loop for any compression step; each forward stops (:class:`StopForward`)
as soon as the group has seen its inputs, so the cost is one partial forward per group and batch.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ._checks import check_callable, check_choice, check_module

__all__ = ["StopForward", "run_batch", "check_calibration", "linear_groups", "calibrate_sequential"]


class StopForward(Exception):
    """Raised by a hook to end a calibration forward once the layers of interest have seen their inputs."""


def run_batch(model: nn.Module, batch) -> None:
    """``model(**batch)`` for a dict, ``model(batch)`` otherwise; a :class:`StopForward` ends it quietly."""
    try:
        model(**batch) if isinstance(batch, dict) else model(batch)
    except StopForward:
        pass


def check_calibration(calibration, name: str = "calibration") -> list:
    """A non-empty list of batches, each a tensor or a dict of model inputs (one batch is wrapped in a list);
    ``name`` is the argument's name in the error messages."""
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    if not isinstance(calibration, Sequence) or not calibration:
        raise TypeError(f"{name} must be a non-empty list of batches (tensors or dicts of model inputs), "
                        f"got {type(calibration).__name__}")
    for batch in calibration:
        if not isinstance(batch, (torch.Tensor, dict)):
            raise TypeError(f"each {'calibration batch' if name == 'calibration' else 'batch'} must be a tensor or "
                            f"a dict of model inputs, got {type(batch).__name__}")
    return list(calibration)


def _output_head(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


@torch.no_grad()
def linear_groups(model: nn.Module, batch) -> list[list[str]]:
    """The model's nn.Linear modules in call order (one forward on ``batch``), consecutive ones that receive the
    very same input tensor grouped (a Llama block gives [q, k, v], [o], [gate, up], [down]). The output head
    (``get_output_embeddings()``, often tied to the embeddings) is left out."""
    check_module("model", model)
    head = _output_head(model)
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [module.register_forward_hook(lambda mod, inp, out, name=name: calls.append((name, inp[0])))
               for name, module in model.named_modules() if isinstance(module, nn.Linear) and module is not head]
    try:
        run_batch(model, check_calibration(batch)[0])
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    seen = set()
    for i, (name, x) in enumerate(calls):
        if name in seen:
            continue
        seen.add(name)
        if i and calls[i - 1][1] is x and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _check_groups(model: nn.Module, groups, calibration: list) -> list[list[str]]:
    modules = dict(model.named_modules())
    groups = linear_groups(model, calibration[0]) if groups is None else [
        [g] if isinstance(g, str) else list(g) for g in groups]
    listed = [name for group in groups for name in group]
    if len(set(listed)) != len(listed):
        raise ValueError(f"a module is named twice in groups: {sorted({n for n in listed if listed.count(n) > 1})}")
    for name in listed:
        if name not in modules:
            raise ValueError(f"unknown module name {name!r}; Linear modules include "
                             f"{[k for k, v in modules.items() if isinstance(v, nn.Linear)][:4]}")
        if not isinstance(modules[name], nn.Linear):
            raise TypeError(f"module {name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
    return groups


def calibrate_sequential(model: nn.Module, calibration, update: Callable, statistic: str = "gram",
                         groups: Iterable | None = None) -> list[list[str]]:
    """Calibrate and compress a model's Linears one group at a time, in place.

    For each group (a list of module names; default :func:`linear_groups`) the calibration batches run through
    the model — whose earlier groups are already compressed — and forward hooks sum each member's statistic
    over its inputs X (flattened to (tokens, in), float32 at least): ``"sq"``, Σ x² per column (Wanda), or
    ``"gram"``, XᵀX (SparseGPT, GPTQ). Then ``update(name, module, total, tokens)`` compresses each member, under
    ``torch.no_grad()``. Each Linear must be called once per forward (true of Hugging Face models).

    Args:
        calibration: a list of batches, each a tensor (``model(batch)``) or a dict (``model(**batch)``).
        groups: module names, each a name or a list of names; names must be nn.Linear modules.

    Returns:
        the groups, in the order they were calibrated.
    """
    check_module("model", model)
    check_callable("update", update)
    statistic = check_choice("statistic", statistic, ("sq", "gram"))
    calibration = check_calibration(calibration)
    groups = _check_groups(model, groups, calibration)
    modules = dict(model.named_modules())
    for group in groups:
        stats = {name: [0.0, 0] for name in group}
        seen: set[str] = set()

        def collect(name: str, x: torch.Tensor) -> None:
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
            stats[name][0] = stats[name][0] + (x.square().sum(0) if statistic == "sq" else x.T @ x)
            stats[name][1] += x.shape[0]
            seen.add(name)
            if len(seen) == len(group):
                raise StopForward

        handles = [modules[name].register_forward_hook(lambda mod, inp, out, name=name: collect(name, inp[0]))
                   for name in group]
        try:
            with torch.no_grad():
                for batch in calibration:
                    seen.clear()
                    run_batch(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            for name in group:
                total, tokens = stats[name]
                if not tokens:
                    raise ValueError(f"module {name!r} was never called by the calibration forward")
                update(name, modules[name], total, tokens)
    return groups
