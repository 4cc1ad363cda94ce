"""Every equation the library cites exists, in the chapter it names.

Docstrings and comments in ``lightlm`` cite the book's equations as ``eq. (label)``, ``eqs. (a), (b)``,
``equation (label)`` or ``{eq}`label```, next to the chapter they come from: "(chapter 6, eq. (kd-loss))".
A label is defined in a chapter's markdown cells as ``$$ ... $$ (label)`` (MyST dollar math), ``(label)=`` or
``:label: label``. The chapter of a citation is the last "chapter N" before it in the same docstring or comment,
else the one chapter the module's docstring names.
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightlm"

CITATION = re.compile(r"\b(?:eqs?\.|equations?)\s*(\([\w-]+\)(?:\s*(?:,|and|or|–|-)\s*\([\w-]+\))*)"
                      r"|\{eq\}`([\w-]+)`", re.IGNORECASE)
LABEL = re.compile(r"\(([\w-]+)\)")
CHAPTER = re.compile(r"\bchapters? (\d+)\b", re.IGNORECASE)
DEFINITIONS = [
    re.compile(r"\$\$.*?\$\$[ \t]*\(([\w-]+)\)", re.S),  # $$ ... $$ (label)
    re.compile(r"^\(([\w-]+)\)=[ \t]*$", re.M),  # (label)= before a heading or block
    re.compile(r"^:label:[ \t]*([\w-]+)[ \t]*$", re.M),  # :label: label inside a {math} block
]


def citations_in(text: str) -> list[tuple[int, str]]:
    """(position, label) of every equation citation in a text."""
    found = []
    for match in CITATION.finditer(text):
        if match.group(2):
            found.append((match.start(), match.group(2)))
        else:
            found.extend((match.start(), label) for label in LABEL.findall(match.group(1)))
    return found


def text_units(path: Path) -> tuple[str, list[tuple[int, str]]]:
    """The module docstring and every (line, docstring or comment) of a Python file."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    units = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                units.append((node.body[0].lineno, docstring))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            units.append((token.start[0], token.string))
    return ast.get_docstring(tree) or "", units


def cited() -> list[tuple[str, int, int | None, str]]:
    """(file, line, chapter or None, label) for every citation in lightlm."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module_docstring, units = text_units(path)
        module_chapters = {int(n) for n in CHAPTER.findall(module_docstring)}
        default = module_chapters.pop() if len(module_chapters) == 1 else None
        for line, text in units:
            for position, label in citations_in(text):
                before = CHAPTER.findall(text[:position])
                chapter = int(before[-1]) if before else default
                found.append((str(path.relative_to(ROOT)), line + text[:position].count("\n"), chapter, label))
    return found


@cache
def labels_of_chapter(chapter: int) -> frozenset[str]:
    notebooks = sorted((ROOT / "notebooks").glob(f"{chapter:02d}_*.ipynb"))
    assert len(notebooks) == 1, f"chapter {chapter}: expected one notebooks/{chapter:02d}_*.ipynb, got {notebooks}"
    cells = json.loads(notebooks[0].read_text(encoding="utf-8"))["cells"]
    markdown = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
    return frozenset(label for pattern in DEFINITIONS for label in pattern.findall(markdown))


CITED = cited()


def test_the_scan_finds_the_citations_it_should():
    # a guard against a regex that silently finds nothing: these three are known to be cited
    labels = {(chapter, label) for _, _, chapter, label in CITED}
    assert {(2, "sdpa"), (6, "kd-loss"), (8, "kl-directions")} <= labels
    assert citations_in("see eqs. (a-b), (c) and equation (d), also {eq}`e`") == [(4, "a-b"), (4, "c"), (24, "d"),
                                                                                  (43, "e")]
    assert labels_of_chapter(6) >= {"softmax-t", "kd-loss", "kd-grad"}


@pytest.mark.parametrize("where, line, chapter, label", CITED, ids=[f"{f}:{n}:{lab}" for f, n, _, lab in CITED])
def test_cited_equation_exists_in_the_named_chapter(where, line, chapter, label):
    assert chapter is not None, (f"{where}:{line} cites eq. ({label}) without naming its chapter; write "
                                 f"'(chapter N, eq. ({label}))'")
    assert label in labels_of_chapter(chapter), (
        f"{where}:{line} cites eq. ({label}) of chapter {chapter}, which defines only "
        f"{sorted(labels_of_chapter(chapter))}")
