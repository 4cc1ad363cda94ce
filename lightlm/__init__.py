"""lightlm — the companion library of *Principles of LLMs and Lightweight Adaptation*.

Four layers; a module imports only from its own layer or the ones above it in this list (tests/test_layers.py):

1. **Techniques** — pure torch, one technique per module, the equation beside the line that computes it, each
   checked against its industrial counterpart: :mod:`~lightlm.attention` (attention, masks, tiled attention),
   :mod:`~lightlm.transformer` (a minimal Transformer), :mod:`~lightlm.llama_blocks` and
   :mod:`~lightlm.llama` (the modern decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, KV cache,
   ``LlamaLM``), :mod:`~lightlm.bpe` (byte-level BPE), :mod:`~lightlm.objectives` (pre-training objectives),
   :mod:`~lightlm.prompting` (label-word scoring with a shared prompt cache, length-grouped batches),
   :mod:`~lightlm.optim` (Adam and AdamW written out, warm-up with cosine decay, gradient clipping),
   :mod:`~lightlm.distill` (knowledge-distillation losses), :mod:`~lightlm.distill_trainer` (those losses in a
   Hugging Face ``Trainer``), :mod:`~lightlm.scaleout` (that Trainer run in one process or many: data
   parallelism with Accelerate), :mod:`~lightlm.onpolicy` (on-policy distillation), :mod:`~lightlm.train` (seeding,
   a small training loop, metrics, padding), :mod:`~lightlm.prune` (magnitude and N:M masks, reparametrisation,
   schedule), :mod:`~lightlm.calibrate` (per-Linear input statistics, sequential calibration),
   :mod:`~lightlm.prune_calib` (Wanda, SparseGPT and the column walk they share with GPTQ),
   :mod:`~lightlm.prune_structured` (heads, neurons and layers of Hugging Face models), :mod:`~lightlm.quant`
   (affine quantization), :mod:`~lightlm.quant_gptq` (GPTQ and round-to-nearest), :mod:`~lightlm.quant_formats`
   (GGUF blocks, NF4, power-of-two and k-means code books), :mod:`~lightlm.quant_linear` (``QuantLinear``: integer
   storage, the int8 matmul, W8A8; ``quantize_model``), :mod:`~lightlm.quant_outliers` (LLM.int8(), SmoothQuant,
   activation maxima), :mod:`~lightlm.lowrank` (truncated-SVD and activation-aware factorization),
   :mod:`~lightlm.reparam` (norm and residual-scale folds, fused and merged Linears), :mod:`~lightlm.adapters`
   (Houlsby adapters, BitFit, freezing, trainable counts), :mod:`~lightlm.qlora` (``NF4Linear``: a frozen NF4
   base for LoRA, ``quantize_nf4``, the rounding a merge costs), :mod:`~lightlm.lora` (``LoRALinear``,
   ``add_lora``, merging and removing LoRA, as PEFT does) and :mod:`~lightlm.lora_io` (adapters saved and loaded
   in PEFT's format).
2. **Measurement** — :mod:`~lightlm.cost` (parameters, bytes, FLOPs: arithmetic only), :mod:`~lightlm.bench`
   (timing, peak memory, the roofline's peak FLOP/s and bandwidth), :mod:`~lightlm.deploy` (a classifier exported
   to ONNX, run by ONNX Runtime and quantized to int8 there, each step checked; onnx and onnxruntime are imported
   inside its functions), :mod:`~lightlm.deploy_llm` (a causal LM exported for ONNX Runtime GenAI by its model
   builder, fp32 or int4, and checked against PyTorch), :mod:`~lightlm.llm_bench` (decoding and prefill tokens/s,
   greedy tokens, perplexity, for a PyTorch model or an export alike) and :mod:`~lightlm.stats` (standard errors, paired bootstrap, McNemar's test, retention).
3. **Infrastructure** — :mod:`~lightlm.zoo` (the real models, offline), :mod:`~lightlm.data` (the data sets),
   :mod:`~lightlm.artefacts` (the chapters' cached artefacts, their registry and ``python -m lightlm.zoo warm``),
   and private helpers: ``_pins`` (the pinned packages and file hashes), ``_packages`` (finding and checking
   them), ``_cache`` (the one cache protocol), ``_hf`` (safe local loading), ``_checks`` (argument checks).
4. **Presentation** — :mod:`~lightlm.plot` (shared figures, tables), :mod:`~lightlm.widgets` (interactive demos
   with a static fallback) and :mod:`~lightlm.exercises` (``check(name, fn)`` for the exercises the reader
   implements).

``import lightlm`` imports only torch and numpy; submodules load on first use (``lightlm.zoo``), and
transformers, datasets, matplotlib and ipywidgets are imported inside the functions that need them.
"""

from __future__ import annotations

import platform

import importlib

from .train import seed_everything

__version__ = "0.5.0"
_SUBMODULES = ("adapters", "artefacts", "attention", "bench", "bpe", "calibrate", "cost", "data", "deploy",
               "deploy_llm", "distill", "distill_trainer", "exercises", "llama", "llama_blocks", "llm_bench",
               "lora", "lora_io", "lowrank", "objectives", "onpolicy", "optim", "plot", "prompting", "prune",
               "prune_calib", "prune_structured", "qlora", "quant", "quant_formats", "quant_gptq", "quant_linear",
               "quant_outliers", "reparam", "scaleout", "stats", "train", "transformer", "widgets", "zoo")
# Where modules of lightlm 0.1 went (``from lightlm import teachers`` keeps working).
_MOVED = {"teachers": "artefacts.teachers", "lm_cache": "artefacts.lm_cache"}
__all__ = [*_SUBMODULES, "seed_everything", "setup", "versions", "__version__"]


def __getattr__(name: str):
    """Import submodules on first use (``lightlm.zoo``), so ``python -m lightlm.zoo`` runs it only once."""
    if name in _SUBMODULES or name in _MOVED:
        return importlib.import_module(f"{__name__}.{_MOVED.get(name, name)}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries a chapter depends on ('-' when not installed).

    Looked up from the installed distributions' metadata, so nothing heavy is imported.
    """
    from importlib import metadata

    found = {"python": platform.python_version(), "lightlm": __version__}
    for name in ("torch", "transformers", "datasets", "peft", "torchao", "numpy", "matplotlib"):
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
    _quiet_optional_imports()
    if not quiet:
        print(" | ".join(f"{name} {version}" for name, version in versions().items()) + f" | seed {seed}")


def _quiet_optional_imports() -> None:
    """Silence two harmless log lines that torchao (pinned for chapter 10) prints when transformers first imports
    it: its CUDA extensions cannot load on a CPU-only machine, and torch deprecates a registration torchao makes;
    and the FutureWarning PEFT 0.21 triggers inside transformers (``is_gradient_checkpointing`` renamed) each
    time it wraps a model (chapter 12). Errors, and every other warning, still show."""
    import logging
    import warnings

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
