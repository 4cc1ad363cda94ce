"""Activation-aware pruning from calibration data (基于激活值的剪枝), chapter 9: Wanda and SparseGPT, one Linear
at a time, and a sequential driver that prunes a model's Linears in call order, each one calibrated on the
outputs of the layers already pruned before it.

Notation: a Linear computes y = x Wᵀ with W of shape (out, in); X is the (tokens, in) matrix of its calibration
inputs. Wanda scores S_ij = |W_ij|·‖X_j‖₂ and prunes the lowest scores within each output row i. SparseGPT
minimises ‖WX − ŴX‖² row by row with the Hessian H = 2XᵀX/tokens: it walks the columns in blocks, prunes in each
block the weights with the lowest w²/[H⁻¹]_jj (from the upper Cholesky factor of the dampened H⁻¹), and spreads
each pruned weight's error over the columns not yet visited (the optimal-brain-surgeon update). Masks follow
:mod:`lightlm.prune`'s conventions (True = kept, round(s·n) zeros, stable ties, N:M keeps n of every m).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ._checks import check_choice, check_int, check_module, check_real, check_tensor
from .prune import lowest_mask, n_pruned, nm_mask, row_mask

__all__ = ["wanda_scores", "wanda_mask", "hessian", "sparsegpt_prune", "linear_groups", "prune_sequential"]


def _inputs_2d(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Calibration inputs (..., in) as (tokens, in), checked against the weight's input width."""
    check_tensor("weight", weight, kind="float", ndim=2)
    check_tensor("inputs", inputs, kind="float", min_ndim=1)
    if inputs.shape[-1] != weight.shape[1]:
        raise ValueError(f"inputs have width {inputs.shape[-1]} but the weight {tuple(weight.shape)} takes "
                         f"{weight.shape[1]} input features (inputs must be (..., {weight.shape[1]}))")
    return inputs.reshape(-1, inputs.shape[-1])


def _target(sparsity, n, m) -> tuple:
    """Exactly one of an unstructured sparsity or an N:M pattern."""
    if (sparsity is None) == (n is None and m is None):
        raise ValueError("give either sparsity (unstructured) or both n and m (N:M), not both and not neither")
    if sparsity is not None:
        return check_real("sparsity", sparsity, min=0, max=1, max_open=True), None, None
    if n is None or m is None:
        raise ValueError(f"N:M needs both n and m, got n={n}, m={m}")
    m = check_int("m", m, min=1)
    n = check_int("n", n, min=1)
    if n > m:
        raise ValueError(f"n must be <= m (keep n of every m weights), got n={n}, m={m}")
    return None, n, m


# --------------------------------------------------------------------------- Wanda


def wanda_scores(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Wanda's importance S_ij = |W_ij|·‖X_j‖₂ (X = inputs flattened to (tokens, in)); shape of ``weight``."""
    x = _inputs_2d(weight, inputs)
    return weight.detach().abs() * torch.linalg.vector_norm(x.to(weight.dtype), dim=0)


def _wanda_from_sq(weight: torch.Tensor, sq: torch.Tensor, sparsity, n, m) -> torch.Tensor:
    scores = weight.detach().abs() * sq.sqrt().to(weight.dtype)
    return row_mask(scores, sparsity) if sparsity is not None else nm_mask(scores, n, m)


def wanda_mask(weight: torch.Tensor, inputs: torch.Tensor, sparsity: float | None = None, *,
               n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Wanda keep-mask (Sun et al. 2023): lowest |W_ij|·‖X_j‖₂ pruned within each output row — ``round(s·in)``
    per row (Wanda's code prunes ``int(in·s)``: the same whenever s·in is whole) — or N:M along each row."""
    sparsity, n, m = _target(sparsity, n, m)
    x = _inputs_2d(weight, inputs)
    return _wanda_from_sq(weight, x.to(weight.dtype).square().sum(0), sparsity, n, m)


# --------------------------------------------------------------------------- SparseGPT


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2XᵀX / tokens for inputs (..., in): the Hessian of ‖WX − ŴX‖² per row, up to scale."""
    check_tensor("inputs", inputs, kind="float", min_ndim=1)
    x = inputs.reshape(-1, inputs.shape[-1])
    return 2 * x.T @ x / x.shape[0]


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None, *,
                    n: int | None = None, m: int | None = None, mask: torch.Tensor | None = None,
                    blocksize: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023) on one weight: prune and reconstruct the rest.

    Args:
        weight: (out, in). hessian: (in, in), e.g. :func:`hessian` of the calibration inputs.
        sparsity: unstructured — in each block of ``blocksize`` columns the ``round(s·numel)`` lowest
            w²/[U]_jj² go, U the upper Cholesky factor of H⁻¹ (the reference prunes ``int(s·numel) + 1``).
        n, m: N:M instead — in each group of m columns, per row, the m − n lowest, chosen as the walk reaches it.
        mask: a fixed keep-mask instead of choosing one (then sparsity, n, m are not given).
        damp: λ = damp · mean(diag H) added to the diagonal (1 %, as the reference).

    Returns:
        ``(pruned weight, keep-mask)``, the weight in its input dtype (computed in float32 at least); pruned
        entries are exactly zero. Columns never seen (diag H = 0) are pruned, as in the reference.
    """
    check_tensor("weight", weight, kind="float", ndim=2)
    check_tensor("hessian", hessian, kind="float", ndim=2)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for a weight with {cols} inputs, got "
                         f"{tuple(hessian.shape)} (calibration inputs of the wrong width?)")
    if mask is None:
        sparsity, n, m = _target(sparsity, n, m)
    elif sparsity is not None or n is not None or m is not None:
        raise ValueError("give a fixed mask or a sparsity / N:M target, not both")
    elif check_tensor("mask", mask).shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the weight's {tuple(weight.shape)}")
    blocksize = check_int("blocksize", blocksize, min=1)
    damp = check_real("damp", damp, min=0)
    if m is not None and (blocksize % m or cols % m):
        raise ValueError(f"N:M needs blocksize ({blocksize}) and the input width ({cols}) to be multiples of m={m}")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(device=W.device, dtype=dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H⁻¹ = UᵀU
    except torch.linalg.LinAlgError as error:
        raise ValueError(f"the dampened Hessian is not positive definite (damp={damp}); raise damp") from error
    keep = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.to(W.device, torch.bool).clone()
    keep[:, dead] = False
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        errors = torch.zeros_like(W1)
        if sparsity is not None:  # adaptive mask of this block, from the weights as updated so far
            scores = W1.square() / d.square()
            keep[:, i1:i2] &= lowest_mask(scores, n_pruned(scores.numel(), sparsity))
        for i in range(i2 - i1):
            if m is not None and i % m == 0:
                keep[:, i1 + i:i1 + i + m] &= nm_mask(W1[:, i:i + m].square() / d[i:i + m].square(), n, m)
            w = W1[:, i]
            q = torch.where(keep[:, i1 + i], w, torch.zeros_like(w))
            errors[:, i] = (w - q) / d[i]
            W1[:, i:] -= errors[:, i:i + 1] * U1[i:i + 1, i:]  # OBS: spread the error over the columns to come
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= errors @ U[i1:i2, i2:]  # lazy update of the later blocks
    return W.to(weight.dtype), keep


# --------------------------------------------------------------------------- sequential driver


class _Stop(Exception):
    """Raised by a hook to end a calibration forward once the layers of interest have seen their inputs."""


def _run(model: nn.Module, batch) -> None:
    try:
        model(**batch) if isinstance(batch, dict) else model(batch)
    except _Stop:
        pass


def _check_calibration(calibration) -> list:
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    if not isinstance(calibration, Sequence) or not calibration:
        raise TypeError("calibration must be a non-empty list of batches (tensors or dicts of model inputs), "
                        f"got {type(calibration).__name__}")
    for batch in calibration:
        if not isinstance(batch, (torch.Tensor, dict)):
            raise TypeError(f"each calibration batch must be a tensor or a dict of model inputs, got "
                            f"{type(batch).__name__}")
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
        _run(model, _check_calibration(batch)[0])
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


def prune_sequential(model: nn.Module, calibration, method: str = "wanda", sparsity: float | None = None, *,
                     n: int | None = None, m: int | None = None, groups: Iterable | None = None,
                     blocksize: int = 128, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Prune a model's Linears one group at a time, in place, from calibration batches (chapter 9).

    For each group (a list of module names pruned together; default :func:`linear_groups`) the calibration
    batches run through the model — whose earlier groups are already pruned — and forward hooks collect the
    group's inputs (‖X_j‖² for ``"wanda"``, XᵀX for ``"sparsegpt"``); the forward stops as soon as every member
    has seen its input, so each Linear must be called once per forward (true of Hugging Face models).

    Args:
        calibration: a list of batches, each a tensor (``model(batch)``) or a dict (``model(**batch)``).
        method: ``"wanda"`` or ``"sparsegpt"``; sparsity or n, m as in :func:`wanda_mask`.
        groups: module names, each a name or a list of names; names must be nn.Linear modules.

    Returns:
        ``{module name: keep-mask}``; the weights are overwritten (pruned, and reconstructed for SparseGPT).
    """
    check_module("model", model)
    method = check_choice("method", method, ("wanda", "sparsegpt"))
    sparsity, n, m = _target(sparsity, n, m)
    calibration = _check_calibration(calibration)
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
    masks = {}
    for group in groups:
        stats = {name: [0.0, 0] for name in group}  # wanda: Σ x², sparsegpt: Σ xᵀx; and the token count
        seen: set[str] = set()

        def collect(name: str, x: torch.Tensor) -> None:
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
            stats[name][0] = stats[name][0] + (x.square().sum(0) if method == "wanda" else x.T @ x)
            stats[name][1] += x.shape[0]
            seen.add(name)
            if len(seen) == len(group):
                raise _Stop

        handles = [modules[name].register_forward_hook(lambda mod, inp, out, name=name: collect(name, inp[0]))
                   for name in group]
        try:
            with torch.no_grad():
                for batch in calibration:
                    seen.clear()
                    _run(model, batch)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            for name in group:
                weight = modules[name].weight
                total, tokens = stats[name]
                if not tokens:
                    raise ValueError(f"module {name!r} was never called by the calibration forward")
                if method == "wanda":
                    masks[name] = _wanda_from_sq(weight, total, sparsity, n, m)
                    weight.mul_(masks[name].to(weight.dtype))
                else:
                    new, masks[name] = sparsegpt_prune(weight, 2 * total / tokens, sparsity, n=n, m=m,
                                                       blocksize=blocksize, damp=damp)
                    weight.copy_(new)
    return masks
