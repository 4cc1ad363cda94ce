"""The library's layers (lightlm/__init__.py): every module sits in one, and imports only from its own layer or a
lower one; modules stay short; nobody reaches into another module's private names.

Imports are read from the source (every ``import`` statement, at module level or inside a function), so a lazy
import counts as much as an eager one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightlm"

# Lowest first. Within infrastructure the order is a chain too (pins < cache < packages < ...).
LAYERS: list[tuple[str, list[str]]] = [
    ("checks", ["_checks"]),
    ("techniques", ["attention", "llama_blocks", "llama", "transformer", "bpe", "objectives", "prompting", "optim",
                    "distill", "distill_trainer", "scaleout", "train", "onpolicy", "prune", "calibrate",
                    "prune_calib", "prune_structured", "quant", "quant_gptq", "quant_formats", "quant_linear",
                    "quant_outliers", "lowrank", "reparam", "adapters", "qlora", "lora", "lora_io"]),
    ("measurement", ["cost", "bench", "deploy", "deploy_llm", "llm_bench", "stats"]),
    ("pins", ["_pins"]),
    ("cache", ["_cache"]),
    ("packages", ["_packages", "_hf"]),
    ("data", ["data"]),
    ("models", ["zoo"]),
    ("artefacts", ["artefacts"]),
    ("presentation", ["plot", "widgets", "exercises"]),
    ("package", ["__init__"]),
]
RANK = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
MAX_LINES = 300


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def top_module(path: Path) -> str:
    """The layer-bearing name of a file: ``zoo/__init__.py`` -> ``zoo``, ``artefacts/teachers.py`` -> ``artefacts``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported(path: Path) -> set[str]:
    """Top-level lightlm modules a file imports (``from .. import zoo`` -> zoo, ``from ._cache import x`` -> _cache)."""
    tree = ast.parse(path.read_text())
    package_parts = path.relative_to(PACKAGE).parent.parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lightlm."):
                    found.add(alias.name.split(".")[1])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module == "lightlm":
                    found.update(alias.name for alias in node.names)
                elif node.module and node.module.startswith("lightlm."):
                    found.add(node.module.split(".")[1])
                continue
            base = list(package_parts[: len(package_parts) - (node.level - 1)])  # the package the dots name
            target = base + (node.module.split(".") if node.module else [])
            if target:
                found.add(target[0])
            else:  # "from . import zoo" at the top of the package
                found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_belongs_to_a_layer(path):
    assert top_module(path) in RANK or path.name == "__main__.py", \
        f"{path.relative_to(PACKAGE)} is in no layer: add it to LAYERS here and to lightlm/__init__.py's docstring"


@pytest.mark.parametrize("path", [p for p in modules() if p.name != "__main__.py"],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    own = top_module(path)
    if own == "__init__":
        return  # the package's lazy __getattr__ names every module by design
    higher = sorted(name for name in imported(path) - {own}
                    if name in RANK and RANK[name] > RANK[own])
    assert not higher, f"{path.relative_to(PACKAGE)} ({own}) imports the higher layer(s) {higher}"


def test_the_import_scan_sees_relative_and_lazy_imports():
    """The scanner itself, on files whose imports are known (so the layer test cannot pass vacuously)."""
    assert {"zoo", "_cache", "_packages", "data", "train"} <= imported(PACKAGE / "artefacts" / "teachers.py")
    assert "distill" in imported(PACKAGE / "artefacts" / "lm_cache.py")  # imported inside a function
    assert imported(PACKAGE / "_pins.py") == set()


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_longer_than_the_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines; split it (limit {MAX_LINES})"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_uses_another_modules_private_names(path):
    """``zoo._offline`` from teachers was how the old layering leaked; private helpers live in ``_`` modules."""
    tree = ast.parse(path.read_text())
    imported_modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                        for alias in node.names}
    leaks = sorted({f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.value.id in RANK
                    and node.attr.startswith("_") and not node.attr.startswith("__")})
    assert not leaks, f"{path.relative_to(PACKAGE)} uses private names of other modules: {leaks}"
