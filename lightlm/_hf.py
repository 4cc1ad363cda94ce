"""Loading Hugging Face objects from local folders only, quietly and safely (private).

Every ``from_pretrained`` in lightlm goes through :func:`from_pretrained`, which always passes
``local_files_only=True`` and ``trust_remote_code=False`` (and ``use_safetensors=True`` for models), so nothing is
downloaded and no code shipped with a checkpoint runs. The process environment is left as it was: lightlm
sets no ``HF_HUB_OFFLINE``, so a reader's own ``from_pretrained("gpt2")`` later in the session still works.
"""

from __future__ import annotations

import os
from contextlib import contextmanager


def prepare() -> None:
    """Quiet defaults for the Hugging Face libraries (set only if the user has not set them)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextmanager
def quiet_loading(errors_only: bool = False):
    """Hide transformers' per-tensor "Loading weights" bars (and, with ``errors_only``, its warnings)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def from_pretrained(auto_class: str, folder, **kwargs):
    """``transformers.<auto_class>.from_pretrained(folder, ...)`` with the safety flags enforced.

    Args:
        auto_class: e.g. ``"AutoTokenizer"``, ``"AutoModel"``, ``"AutoModelForCausalLM"``.
        folder: a local folder.
        kwargs: passed on; ``local_files_only``, ``trust_remote_code`` and ``use_safetensors`` may not be overridden.
    """
    forced = {"local_files_only": True, "trust_remote_code": False}
    if auto_class != "AutoTokenizer" and "gguf_file" not in kwargs:
        forced["use_safetensors"] = True
    clash = sorted(key for key in forced if key in kwargs)
    if clash:
        raise ValueError(f"{clash} are set by lightlm and may not be overridden")
    prepare()
    import transformers

    with quiet_loading():
        return getattr(transformers, auto_class).from_pretrained(folder, **kwargs, **forced)
