"""lightlm — the companion library of *Principles of LLMs and Lightweight Adaptation*.

One short module per technique. ``import lightlm`` imports only torch and numpy; transformers, datasets,
matplotlib and ipywidgets are imported inside the functions that need them.

Modules: :mod:`lightlm.cost` (parameters, bytes, FLOPs, timing), :mod:`lightlm.zoo` (offline models and
data), :mod:`lightlm.train` (seeding, a small training loop, metrics), :mod:`lightlm.attention` (attention,
masks, tiled attention), :mod:`lightlm.distill` (knowledge-distillation losses and a
Trainer), :mod:`lightlm.transformer` (a minimal Transformer), :mod:`lightlm.objectives`
(pre-training objectives), :mod:`lightlm.optim` (Adam and AdamW written out), :mod:`lightlm.plot` (shared
figures), :mod:`lightlm.widgets` (interactive demos with a static fallback).
"""

from __future__ import annotations

import platform

import importlib

from .train import seed_everything

__version__ = "0.1.0"
_SUBMODULES = ("attention", "cost", "distill", "lm_cache", "objectives", "optim", "plot", "teachers", "train",
               "transformer", "widgets", "zoo")
__all__ = [*_SUBMODULES, "seed_everything", "setup", "versions", "__version__"]


def __getattr__(name: str):
    """Import submodules on first use (``lightlm.zoo``), so ``python -m lightlm.zoo`` runs it only once."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries a chapter depends on ('-' when not installed).

    Looked up from the installed distributions' metadata, so nothing heavy is imported.
    """
    from importlib import metadata

    found = {"python": platform.python_version(), "lightlm": __version__}
    for name in ("torch", "transformers", "datasets", "peft", "numpy", "matplotlib"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def setup(seed: int = 0, *, quiet: bool = False) -> None:
    """Prepare a chapter: seed every random generator and print the versions in use.

    Called by the setup cell that opens every notebook.

    Args:
        seed: seed for Python's ``random``, NumPy and torch.
        quiet: if True, print nothing.

    Returns nothing, so that the setup cell shows only the printed line; see :func:`versions`.
    """
    seed_everything(seed)
    if not quiet:
        print(" | ".join(f"{name} {version}" for name, version in versions().items()) + f" | seed {seed}")
