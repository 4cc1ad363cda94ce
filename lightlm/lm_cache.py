"""Cached teacher outputs for distilling a causal LM (chapter 6, "Distilling a causal LM").

The teacher is SmolLM2-135M (:func:`lightlm.zoo.load_smollm2`), whose 49,152-way softmax makes it costly to run
alongside a student. So it runs once, here, and what the student needs is stored under
``lightlm.zoo.cache_dir()/smollm2-news-distill``:

* token-level KD: fixed, seeded windows of ``seq_len`` SmolLM2 tokens cut from ``zoo.news_corpus("train")``,
  with the teacher's top-k next-token log-probabilities at every position (:func:`lightlm.distill.topk_teacher`,
  eq. (topk-cache): values fp16, token ids int32), and held-out windows from ``news_corpus("validation")`` with
  their top-k and the teacher's log-probability of each true next token (its held-out perplexity);
* sequence-level KD (Kim & Rush, 2016): the teacher's continuations (greedy by default) of
  ``prompt_len``-token prompts taken from the first training windows.

A JSON manifest records the settings and :data:`VERSION`; a cache whose manifest differs is rebuilt. Files are
written to a staging folder and moved into place with ``os.replace``. ``python -m lightlm.zoo warm`` builds it.
Only torch is imported at load time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

__all__ = ["VERSION", "LMCacheConfig", "cache_path", "build_lm_cache", "load_lm_cache", "warm_lm_cache"]

VERSION = 1  # bump when the format or the recipe changes: every cache built before is then rebuilt
_FOLDER, _TENSORS, _MANIFEST = "smollm2-news-distill", "tensors.safetensors", "manifest.json"


@dataclass(frozen=True)
class LMCacheConfig:
    """What to cache. The defaults are the chapter's (about a minute to build on 2 CPU cores with bf16).

    Attributes:
        seq_len: tokens per window (and per generated sequence, prompt included).
        n_train, n_heldout: windows from the train and validation splits of the news corpus.
        k: teacher tokens kept per position.
        n_generations: teacher continuations for sequence-level KD (prompts from the first training windows).
        prompt_len: prompt tokens of each; the teacher adds ``seq_len - prompt_len``.
        temperature: 0 for greedy generations (the teacher's approximate mode, as Kim & Rush's beam search),
            else the sampling temperature (the top-k log-probs are always at T = 1).
        seed: fixes the windows and the sampling.
        batch_size: windows per teacher forward pass (the notebook recomputes the first batch with it).
    """

    seq_len: int = 32
    n_train: int = 640
    n_heldout: int = 128
    k: int = 32
    n_generations: int = 640
    prompt_len: int = 8
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = float if f.name == "temperature" else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise TypeError(f"{f.name} must be {'a number' if kind is float else 'an int'}, "
                                f"got {type(value).__name__}")
        for name in ("seq_len", "n_train", "n_heldout", "k", "n_generations", "prompt_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (a window needs a next token), got {self.seq_len}")
        if not self.prompt_len < self.seq_len:
            raise ValueError(f"prompt_len ({self.prompt_len}) must be shorter than seq_len ({self.seq_len})")
        if self.n_generations > self.n_train:
            raise ValueError(f"n_generations ({self.n_generations}) must be <= n_train ({self.n_train}): "
                             "the prompts are the starts of the training windows")
        if not 1 <= self.k <= 49152:
            raise ValueError(f"k must be in [1, 49152] (SmolLM2's vocabulary), got {self.k}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be 0 (greedy) or positive and finite, got {self.temperature}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def cache_path() -> Path:
    """Folder of the chapter-6 cache (tensors and manifest)."""
    from lightlm import zoo

    return zoo.cache_dir() / _FOLDER


def _bf16() -> bool:
    """Teacher products in bf16 where the CPU has bf16 instructions (4x faster here), else fp32."""
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def _manifest_for(config: LMCacheConfig) -> dict:
    from lightlm import zoo

    return {"version": VERSION, "config": asdict(config), "teacher": zoo.SMOLLM2_GGUF,
            "teacher_sha256": zoo.SMOLLM2_GGUF_SHA256, "bf16_autocast": _bf16(),
            "heldout_split": "validation"}


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _is_fresh(folder: Path, config: LMCacheConfig) -> bool:
    manifest = _read_manifest(folder)
    if manifest is None or not (folder / _TENSORS).is_file():
        return False
    expected = _manifest_for(config)
    return all(manifest.get(key) == value for key, value in expected.items()) and \
        (folder / _TENSORS).stat().st_size == manifest.get("tensors_bytes")


def _windows(tokenizer, text: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens, each starting at a word boundary at a seeded random offset."""
    generator = torch.Generator().manual_seed(seed)
    span = 12 * seq_len  # characters: enough for seq_len tokens (about 4.5 characters per token)
    if len(text) < 2 * span:
        raise ValueError(f"the text ({len(text):,} characters) is too short for windows of {seq_len} tokens")
    rows: list[list[int]] = []
    while len(rows) < n:
        starts = torch.randint(len(text) - span, (n - len(rows),), generator=generator).tolist()
        pieces = [text[s:s + span] for s in starts]
        pieces = [p[p.index(" ") + 1:] if " " in p else p for p in pieces]  # begin at a word
        ids = tokenizer(pieces, add_special_tokens=False)["input_ids"]
        rows += [row[:seq_len] for row in ids if len(row) >= seq_len]
    return torch.tensor(rows[:n], dtype=torch.int32)  # (n, seq_len)


@torch.inference_mode()
def _teacher_topk(model, ids: torch.Tensor, config: LMCacheConfig, bar, targets: bool = False):
    """Top-k log-probs (fp16 values, int32 ids) for every position; optionally log p(true next token)."""
    from lightlm import distill

    values, indices, target_logprobs = [], [], []
    for first in range(0, len(ids), config.batch_size):
        batch = ids[first:first + config.batch_size].long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16()):
            logits = model(input_ids=batch).logits  # (batch, seq, 49152) teacher logits v
        top_values, top_indices = distill.topk_teacher(logits, config.k)  # eq. (topk-cache), T = 1
        values.append(top_values.half())
        indices.append(top_indices.int())
        if targets:  # log p(x_{t+1} | x_{≤t}) for the teacher's perplexity
            log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            target_logprobs.append(log_p.gather(-1, batch[:, 1:, None])[..., 0])
        bar.update(len(batch))
    out = {"topk_values": torch.cat(values), "topk_indices": torch.cat(indices)}
    if targets:
        out["target_logprobs"] = torch.cat(target_logprobs)
    return out


@torch.inference_mode()
def _generate(model, prompts: torch.Tensor, config: LMCacheConfig, bar) -> torch.Tensor:
    """Continuations of the prompts: greedy at temperature 0, else pure sampling (no top-k or top-p cut)."""
    sequences, batch_size = [], 4 * config.batch_size
    torch.manual_seed(config.seed)  # transformers samples with the global generator
    sampling = {"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0} \
        if config.temperature > 0 else {"do_sample": False}
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size].long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_bf16()):
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **sampling,
                                 max_new_tokens=config.seq_len - config.prompt_len,
                                 min_new_tokens=config.seq_len - config.prompt_len,
                                 pad_token_id=model.config.eos_token_id)
        sequences.append(out.int())
        bar.update(len(batch))
    return torch.cat(sequences)  # (n_generations, seq_len)


def build_lm_cache(config: LMCacheConfig | None = None, progress: bool = True, teacher=None) -> Path:
    """Run the teacher once and store what chapter 6 needs; returns the cache folder.

    Args:
        config: sizes and seeds (default :class:`LMCacheConfig`).
        progress: show a tqdm progress bar.
        teacher: ``(tokenizer, model)`` to use instead of loading SmolLM2 (tests pass their loaded copy).
    """
    config = LMCacheConfig() if config is None else config
    if not isinstance(config, LMCacheConfig):
        raise TypeError(f"config must be an LMCacheConfig, got {type(config).__name__}")
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from lightlm import zoo

    start = time.perf_counter()
    tokenizer, model = zoo.load_smollm2(progress=progress) if teacher is None else teacher
    train_ids = _windows(tokenizer, zoo.news_corpus("train"), config.n_train, config.seq_len, config.seed)
    heldout_ids = _windows(tokenizer, zoo.news_corpus("validation"), config.n_heldout, config.seq_len,
                           config.seed + 1)
    total = config.n_train + config.n_heldout + config.n_generations
    with tqdm(total=total, desc="SmolLM2 top-k cache (chapter 6)", unit="seq", disable=not progress) as bar:
        train = _teacher_topk(model, train_ids, config, bar)
        heldout = _teacher_topk(model, heldout_ids, config, bar, targets=True)
        generated = _generate(model, train_ids[:config.n_generations, :config.prompt_len], config, bar)
    tensors = {"train_ids": train_ids, "heldout_ids": heldout_ids, "generated_ids": generated,
               **{f"train_{key}": value for key, value in train.items()},
               **{f"heldout_{key}": value for key, value in heldout.items()}}
    folder = cache_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, staging / _TENSORS)
    manifest = {**_manifest_for(config), "tensors_bytes": (staging / _TENSORS).stat().st_size,
                "build_seconds": round(time.perf_counter() - start, 1)}
    (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def load_lm_cache(config: LMCacheConfig | None = None, progress: bool = True) -> dict:
    """The cached tensors (built first if missing or stale), plus ``"manifest"``.

    Keys: ``train_ids`` (n_train, seq_len) int32; ``train_topk_values`` fp16 and ``train_topk_indices`` int32,
    (n_train, seq_len, k), the teacher's log p at position t for token t + 1; the same three for ``heldout_``,
    plus ``heldout_target_logprobs`` (n_heldout, seq_len − 1) fp32; ``generated_ids`` (n_generations, seq_len).
    """
    config = LMCacheConfig() if config is None else config
    if not isinstance(config, LMCacheConfig):
        raise TypeError(f"config must be an LMCacheConfig, got {type(config).__name__}")
    from safetensors.torch import load_file

    folder = cache_path()
    if not _is_fresh(folder, config):
        build_lm_cache(config, progress=progress)
    tensors = load_file(folder / _TENSORS)
    tensors["manifest"] = _read_manifest(folder)
    return tensors


def warm_lm_cache(config: LMCacheConfig | None = None) -> str:
    """Build the cache unless a fresh one exists; a one-line report (for ``python -m lightlm.zoo warm``)."""
    config = LMCacheConfig() if config is None else config
    folder = cache_path()
    if _is_fresh(folder, config):
        return f"cached at {folder}"
    build_lm_cache(config, progress=True)
    manifest = _read_manifest(folder)
    return (f"built at {folder} in {manifest['build_seconds']:.0f} s "
            f"({manifest['tensors_bytes'] / 1e6:.1f} MB, bf16 teacher: {manifest['bf16_autocast']})")
