"""Seeding, a small training / evaluation loop with a progress bar, and the metrics the chapters report.

The loop is deliberately plain: a reader can see every step. Anything model-specific lives in the
``loss_fn(model, batch)`` the caller passes in, so the same loop trains a classifier, a causal LM or a
distilled student.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and, if present, CUDA) with one integer."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses; this interpreter's hash seed is fixed at start
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max over the last dimension equals the label."""
    if logits.ndim < 1 or logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits (..., classes) and labels (...) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("cannot compute the accuracy of an empty batch")
    return (logits.argmax(-1) == labels).float().mean().item()


def perplexity(mean_nll: float | torch.Tensor) -> float:
    """Perplexity = exp(mean negative log-likelihood per token, in nats)."""
    value = float(mean_nll)
    if math.isnan(value) or value < 0:
        raise ValueError(f"mean negative log-likelihood must be >= 0, got {value}")
    return math.exp(value)


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

    Args:
        batches: an iterable of batches (a ``DataLoader``, a list ...). Re-iterated once per epoch.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        steps: stop after this many optimiser steps (cycling through ``batches`` as needed); if None,
            run ``epochs`` full passes.
        max_grad_norm: clip the gradient norm to this value before each step.
        progress: show a tqdm progress bar.
    """
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int or None, got {steps!r}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if steps is not None:
        stream, total = itertools.islice(_repeat(batches), steps), steps
    else:
        stream = itertools.chain.from_iterable(batches for _ in range(epochs))
        total = len(batches) * epochs if hasattr(batches, "__len__") else None
    model.train()
    losses: list[float] = []
    for batch in _progress(stream, total, desc, progress):
        loss = loss_fn(model, batch)
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
    """Weighted mean of a metric over batches, in eval mode without gradients.

    ``metric_fn(model, batch) -> (value, weight)``: e.g. (accuracy, batch size) or (mean token NLL, number
    of tokens), so the result is the mean over examples or tokens, not over batches.
    """
    model.eval()
    total, weight = 0.0, 0
    for batch in _progress(batches, len(batches) if hasattr(batches, "__len__") else None, desc, progress):
        value, count = metric_fn(model, batch)
        total += float(value) * count
        weight += count
    if weight == 0:
        raise ValueError("no examples were evaluated (empty batches, or metric_fn returned zero weights)")
    return total / weight
