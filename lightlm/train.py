"""Seeding, a small training / evaluation loop with a progress bar, a padding collate helper, and the
metrics the chapters report.

The loop is deliberately plain: a reader can see every step. Anything model-specific lives in the
``loss_fn(model, batch)`` the caller passes in, so the same loop trains a classifier, a causal LM or a
distilled student. Both :func:`train_loop` and :func:`evaluate` leave the model in eval mode.
"""

from __future__ import annotations

import itertools
import math
from collections import abc
import os
import random
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from ._checks import check_bool, check_callable, check_int, check_module, check_real, check_tensor

__all__ = ["seed_everything", "pad", "accuracy", "perplexity", "train_loop", "evaluate"]


def seed_everything(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and, if present, CUDA) with one integer in [0, 2**32)."""
    seed = check_int("seed", seed, min=0, max=2**32 - 1)
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses; this interpreter's hash seed is fixed at start
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pad(sequences: list[torch.Tensor] | tuple[torch.Tensor, ...], pad_id: int = 0
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token-id tensors into ``(input_ids, attention_mask)``, each (batch, longest), int64.

    ``input_ids`` holds each sequence followed by ``pad_id``; ``attention_mask`` is 1 at tokens and 0 at
    padding, as a Hugging Face tokenizer returns them with ``padding=True``. The result is on the
    sequences' device. A generic collate helper: ``DataLoader(..., collate_fn=pad)`` for batches of ids.
    """
    if not isinstance(sequences, (list, tuple)):
        raise TypeError(f"sequences must be a list or tuple of 1-D token-id tensors, got {type(sequences).__name__}")
    if not sequences:
        raise ValueError("pad needs at least one sequence, got an empty list")
    for index, seq in enumerate(sequences):
        check_tensor(f"sequences[{index}]", seq, kind="int", ndim=1)
        if seq.device != sequences[0].device:
            raise ValueError(f"sequences must share one device: sequences[0] is on {sequences[0].device}, "
                             f"sequences[{index}] on {seq.device}")
    pad_id = check_int("pad_id", pad_id, min=0)
    longest, device = max(len(seq) for seq in sequences), sequences[0].device
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    return ids, mask


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max over the last dimension equals the label.

    ``logits`` (..., classes), real-valued; ``labels`` (...), integer class ids.
    """
    check_tensor("logits", logits, min_ndim=1)
    check_tensor("labels", labels, kind="int")
    if logits.dtype.is_complex or logits.dtype == torch.bool:
        raise TypeError(f"logits must be real-valued scores, got dtype {logits.dtype}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits (..., classes) and labels (...) disagree: {tuple(logits.shape)} vs "
                         f"{tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("cannot compute the accuracy of an empty batch")
    return (logits.argmax(-1) == labels).float().mean().item()


def perplexity(mean_nll: float | torch.Tensor) -> float:
    """Perplexity = exp(mean negative log-likelihood per token, in nats); ``math.inf`` when that overflows
    (a mean NLL above about 709 nats, far beyond any model that learned anything)."""
    if isinstance(mean_nll, torch.Tensor):
        if mean_nll.numel() != 1 or mean_nll.dtype.is_complex:
            raise ValueError(f"mean_nll must be one real number, got a tensor of shape {tuple(mean_nll.shape)}")
        mean_nll = mean_nll.item()
    mean_nll = check_real("mean_nll (a mean negative log-likelihood)", mean_nll, min=0, finite=False)
    try:
        return math.exp(mean_nll)
    except OverflowError:  # exp(x) > 1.8e308
        return math.inf


def _progress(iterable: Iterable, total: int | None, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def train_loop(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int | None = None,
    epochs: int = 1,
    scheduler: Any = None,
    max_grad_norm: float | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` and return the loss of every step.

    The model is put in train mode for the loop and left in EVAL mode when it returns (ready to be
    evaluated; call ``model.train()`` to continue training by hand).

    Args:
        batches: an iterable of batches (a ``DataLoader``, a list ...). Re-iterated once per epoch, so with
            ``epochs > 1`` it must be re-iterable: a one-shot iterator (a generator) is refused.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        optimizer: a ``torch.optim.Optimizer``; ``scheduler.step()`` (if given) runs after each step.
        steps: stop after this many optimiser steps (cycling through ``batches`` as needed; a one-shot
            iterator is fine if it yields enough); if None, run ``epochs`` full passes.
        max_grad_norm: clip the gradient norm to this value before each step.
        progress: show a tqdm progress bar.
    """
    check_module("model", model)
    check_callable("loss_fn", loss_fn)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if steps is not None:
        check_int("steps", steps, min=1)
    check_int("epochs", epochs, min=1)
    if max_grad_norm is not None:
        check_real("max_grad_norm", max_grad_norm, min=0, min_open=True)
    check_bool("progress", progress)
    if not isinstance(batches, abc.Iterable):
        raise TypeError(f"batches must be an iterable of batches (a list, a DataLoader), "
                        f"got {type(batches).__name__}")
    if steps is None and epochs > 1 and isinstance(batches, abc.Iterator):  # iter(batches) is batches
        raise TypeError(f"epochs={epochs} needs batches that can be iterated again each epoch (a list, a "
                        f"DataLoader), got a one-shot iterator ({type(batches).__name__}); pass list(batches), "
                        "or steps= instead of epochs")
    if steps is not None:
        stream, total = itertools.islice(_repeat(batches), steps), steps
    else:
        stream = _epochs(batches, epochs)
        total = len(batches) * epochs if hasattr(batches, "__len__") else None
    model.train()
    losses: list[float] = []
    for batch in _progress(stream, total, desc, progress):
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if loss.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _epochs(batches: Iterable, epochs: int) -> Iterable:
    """``epochs`` passes over re-iterable batches; an empty pass is an error, as in steps mode."""
    for epoch in range(epochs):
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("batches is empty: there is nothing to train on" if epoch == 0 else
                             f"batches yielded nothing in epoch {epoch + 1}: it cannot be re-iterated; "
                             "pass a list or a DataLoader")


def _repeat(batches: Iterable) -> Iterable:
    """Cycle through re-iterable batches (a list, a DataLoader) without caching them like itertools.cycle."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError(
                "batches ran out: it is empty, or a one-shot iterator that cannot be re-iterated; "
                "pass a list or a DataLoader, or fewer steps"
            )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Any],
    metric_fn: Callable[[nn.Module, Any], tuple[float, int]],
    *,
    progress: bool = False,
    desc: str = "evaluate",
) -> float:
    """Weighted mean of a metric over batches, in eval mode without gradients (the model stays in eval mode).

    ``metric_fn(model, batch) -> (value, weight)``: e.g. (accuracy, batch size) or (mean token NLL, number
    of tokens), so the result is the mean over examples or tokens, not over batches.
    """
    check_module("model", model)
    check_callable("metric_fn", metric_fn)
    check_bool("progress", progress)
    model.eval()
    total, weight = 0.0, 0
    for batch in _progress(batches, len(batches) if hasattr(batches, "__len__") else None, desc, progress):
        value, count = metric_fn(model, batch)
        total += float(value) * count
        weight += count
    if weight == 0:
        raise ValueError("no examples were evaluated (empty batches, or metric_fn returned zero weights)")
    return total / weight
