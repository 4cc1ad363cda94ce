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

from typing import Callable, Iterable

import torch
from torch import nn

from ._checks import check_choice, check_int, check_module, check_real, check_tensor
from .calibrate import calibrate_sequential, linear_groups
from .prune import lowest_mask, n_pruned, nm_mask, row_mask

__all__ = ["wanda_scores", "wanda_mask", "hessian", "inverse_hessian_factor", "obs_walk", "sparsegpt_prune",
           "linear_groups", "prune_sequential"]


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


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor,
                           damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """U, the upper Cholesky factor of (H + λI)⁻¹ = UᵀU with λ = damp · mean(diag H), and the mask of dead
    columns (diag H = 0: never seen), whose entries of ``weight`` (float, modified in place) are set to 0."""
    H = hessian.detach().to(weight.dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    weight[:, dead] = 0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead
    except torch.linalg.LinAlgError as error:
        raise ValueError(f"the dampened Hessian is not positive definite (damp={damp}); raise damp") from error


def obs_walk(W: torch.Tensor, U: torch.Tensor, column: Callable, blocksize: int = 128,
             block: Callable | None = None) -> torch.Tensor:
    """The optimal-brain-surgeon column walk SparseGPT and GPTQ share, in place on W (out, in), U from
    :func:`inverse_hessian_factor`.

    Columns are visited left to right in blocks of ``blocksize``. ``block(i1, W1, d)`` (optional) sees each block
    (W1, its current weights; d, the diagonal of U's block) before its first column; ``column(j, rest, d)``
    returns the new value of column j (pruned or quantized) from ``rest`` = the block's current columns j, j+1,
    …, and their d. The column's error (w − q)/d_j is spread over the block's later columns at once and over the
    later blocks lazily, in one matmul per block.
    """
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        d = torch.diagonal(U1)
        errors = torch.zeros_like(W1)
        if block is not None:
            block(i1, W1, d)
        for i in range(i2 - i1):
            w = W1[:, i].clone()
            q = column(i1 + i, W1[:, i:], d[i:])
            errors[:, i] = (w - q) / d[i]
            W1[:, i:] -= errors[:, i:i + 1] * U1[i:i + 1, i:]  # OBS: spread the error over the columns to come
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= errors @ U[i1:i2, i2:]  # lazy update of the later blocks
    return W


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
    U, dead = inverse_hessian_factor(hessian.to(W.device), W, damp)
    keep = torch.ones_like(W, dtype=torch.bool) if mask is None else mask.to(W.device, torch.bool).clone()
    keep[:, dead] = False

    def choose_block(i1: int, W1: torch.Tensor, d: torch.Tensor) -> None:  # adaptive mask of this block
        if sparsity is not None:
            scores = W1.square() / d.square()
            keep[:, i1:i1 + W1.shape[1]] &= lowest_mask(scores, n_pruned(scores.numel(), sparsity))

    def prune_column(j: int, rest: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if m is not None and j % m == 0:
            keep[:, j:j + m] &= nm_mask(rest[:, :m].square() / d[:m].square(), n, m)
        return torch.where(keep[:, j], rest[:, 0], torch.zeros_like(rest[:, 0]))

    obs_walk(W, U, prune_column, blocksize, choose_block)
    return W.to(weight.dtype), keep


# --------------------------------------------------------------------------- sequential driver


def prune_sequential(model: nn.Module, calibration, method: str = "wanda", sparsity: float | None = None, *,
                     n: int | None = None, m: int | None = None, groups: Iterable | None = None,
                     blocksize: int = 128, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Prune a model's Linears one group at a time, in place, from calibration batches (chapter 9).

    :func:`lightlm.calibrate.calibrate_sequential` runs the calibration batches through the model — whose
    earlier groups are already pruned — and collects each group's inputs (‖X_j‖² for ``"wanda"``, XᵀX for
    ``"sparsegpt"``); each member is then pruned (and reconstructed, for SparseGPT).

    Args:
        calibration: a list of batches, each a tensor (``model(batch)``) or a dict (``model(**batch)``).
        method: ``"wanda"`` or ``"sparsegpt"``; sparsity or n, m as in :func:`wanda_mask`.
        groups: module names, each a name or a list of names (default
            :func:`lightlm.calibrate.linear_groups`); names must be nn.Linear modules.

    Returns:
        ``{module name: keep-mask}``; the weights are overwritten.
    """
    check_module("model", model)
    method = check_choice("method", method, ("wanda", "sparsegpt"))
    sparsity, n, m = _target(sparsity, n, m)
    masks = {}

    def prune(name: str, module: nn.Linear, total: torch.Tensor, tokens: int) -> None:
        weight = module.weight
        if method == "wanda":
            masks[name] = _wanda_from_sq(weight, total, sparsity, n, m)
            weight.mul_(masks[name].to(weight.dtype))
        else:
            new, masks[name] = sparsegpt_prune(weight, 2 * total / tokens, sparsity, n=n, m=m, blocksize=blocksize,
                                               damp=damp)
            weight.copy_(new)

    calibrate_sequential(model, calibration, prune, "sq" if method == "wanda" else "gram", groups)
    return masks
