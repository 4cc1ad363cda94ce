"""Notebook and book hygiene: what every chapter must be before it is committed."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _code(path):
    return ["".join(c["source"]) for c in _cells(path) if c["cell_type"] == "code"]


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    walk(toc.get("chapters", []))
    return files


def test_there_is_at_least_one_chapter():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_name_is_number_and_topic(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_the_shared_setup_cell(path):
    script = _load_script("sync_setup_cell")
    first = _cells(path)[0]
    assert first["cell_type"] == "code" and "".join(first["source"]) == script.setup_cell_source(), (
        "run: python scripts/sync_setup_cell.py"
    )
    assert first["metadata"].get("tags") == script.SETUP_TAGS


def test_setup_cell_installs_the_release_the_book_was_built_with():
    import lightlm

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    source = _load_script("sync_setup_cell").setup_cell_source()
    assert f"git+{config['repository']['url']}@v{lightlm.__version__}\"" in source  # a tag, not a branch
    assert "@main" not in source
    assert "enable_custom_widget_manager" in source and "--no-deps" in source and "ipywidgets" not in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_lightlm_and_asserts(path):
    code = "\n".join(_code(path))
    assert re.search(r"^\s*(import lightlm|from lightlm)", code, re.M)
    assert re.search(r"\bassert\b|assert_close", "\n".join(_code(path)[1:]))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_never_prints_a_verdict(path):
    assert not re.search(r"print\([^)]*(passed|PASSED|✓|\bOK\b)", "\n".join(_code(path)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_is_introduced_by_prose(path):
    cells = _cells(path)
    for before, cell in zip(cells, cells[1:]):
        if cell["cell_type"] == "code" and "hide-input" not in cell["metadata"].get("tags", []):
            assert before["cell_type"] == "markdown", "".join(cell["source"])[:200]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_has_exercises_and_a_summary(path):
    markdown = "\n".join("".join(c["source"]) for c in _cells(path) if c["cell_type"] == "markdown")
    assert re.search(r"^## Exercises", markdown, re.M) and re.search(r"^## Summary", markdown, re.M)
    assert "solution" in markdown.lower()


def test_toc_lists_every_page_and_every_entry_exists():
    listed = _toc_files()
    for entry in listed:
        assert any((ROOT / f"{entry}{ext}").exists() for ext in (".md", ".ipynb")), f"{entry} is in _toc.yml but missing"
    pages = [p.relative_to(ROOT).with_suffix("").as_posix() for p in NOTEBOOKS + sorted((ROOT / "book").glob("*.md"))]
    missing = sorted(set(pages) - set(listed))
    assert not missing, f"not in _toc.yml: {missing}"
    assert len(listed) == len(set(listed))


def test_config_keeps_execution_strict():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "cache"
    assert config["execute"]["raise_on_error"] is True
    assert "path_to_book" not in config.get("repository", {})  # it would put /./ in the Colab link
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


def test_readme_installs_the_same_release_as_the_setup_cell():
    import lightlm

    readme = (ROOT / "README.md").read_text() + (ROOT / "book" / "preface.md").read_text()
    pins = re.findall(r"git\+https://\S+?@(v[0-9][^\s\"]*)", readme)
    assert pins and set(pins) == {f"v{lightlm.__version__}"}, pins


# --------------------------------------------------------------------------- exercises and their solutions
# A solution with code is executed: sphinx-exercise's gated form, a Markdown cell "{solution-start} label",
# then code cells that the build runs, then a Markdown cell "{solution-end}". A code fence (or an indented code
# block) inside a Markdown solution is code that no build ever runs, so it can rot unseen: it fails here.
EXERCISE = re.compile(r"^:::+\{exercise\}.*?^:label:\s*(\S+)", re.M | re.S)
SOLUTION_BLOCK = re.compile(r"^(:::+)\{solution\}\s*(\S+)\s*\n(.*?)^\1\s*$", re.M | re.S)
GATE = re.compile(r"^(?:```|:::)\{solution-(start|end)\}[ \t]*(\S*)", re.M)
FENCE = re.compile(r"^\s*(```|~~~)")


def _markdown_code(body):
    """Lines of ``body`` that Markdown would show as code: a fence, or a block indented 4 spaces after a blank."""
    lines, found = body.splitlines(), []
    for before, line in zip([""] + lines, lines):
        if FENCE.match(line) or (line.startswith("    ") and line.strip() and not before.strip()):
            found.append(line)
    return found


def solution_problems(cells):
    """Everything wrong with a notebook's exercises and solutions, as sentences (empty: all is well)."""
    problems, exercises, solved, gate = [], [], [], None
    for index, cell in enumerate(cells):
        text = "".join(cell["source"])
        if cell["cell_type"] == "code":
            if gate is not None:
                gate["code"] += 1
            continue
        if cell["cell_type"] != "markdown":
            continue
        exercises += EXERCISE.findall(text)
        if re.search(r"^```+\{(exercise|solution)\}", text, re.M):
            problems.append(f"cell {index}: write exercises and solutions as ::: blocks, not ``` fences")
        for _, label, body in SOLUTION_BLOCK.findall(text):
            solved.append(label)
            for line in _markdown_code(body):
                problems.append(f"cell {index}: solution {label} shows code that never runs: {line.strip()[:60]!r}")
        gates = GATE.findall(text)
        if gate is not None and not gates:  # a Markdown cell inside a gated solution
            for line in _markdown_code(text):
                problems.append(f"cell {index}: solution {gate['label']} shows code that never runs: {line[:60]!r}")
        for kind, label in gates:
            if kind == "start":
                if gate is not None:
                    problems.append(f"cell {index}: solution {label} starts inside solution {gate['label']}")
                gate = {"label": label, "code": 0}
                solved.append(label)
                after = text[text.index("{solution-start}"):].split("\n", 1)[-1]
                for line in _markdown_code(after.split("```", 1)[-1] if after.lstrip().startswith(":") else after):
                    problems.append(f"cell {index}: solution {label} shows code that never runs: {line[:60]!r}")
            else:
                if gate is None:
                    problems.append(f"cell {index}: solution-end without a solution-start")
                elif gate["code"] == 0:
                    problems.append(f"cell {index}: gated solution {gate['label']} has no code cell: use :::{{solution}}")
                gate = None
    if gate is not None:
        problems.append(f"solution {gate['label']} has no solution-end")
    for label in sorted(set(solved) - set(exercises)):
        problems.append(f"solution {label} answers no exercise of this chapter")
    for label in sorted(set(exercises) - set(solved)):
        problems.append(f"exercise {label} has no solution")
    for label in sorted({x for x in solved if solved.count(x) > 1}):
        problems.append(f"exercise {label} has more than one solution")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_has_one_solution_and_solution_code_runs(path):
    problems = solution_problems(_cells(path))
    assert not problems, "\n".join(problems)


def _md(text):
    return {"cell_type": "markdown", "source": text}


def _code_cell(text):
    return {"cell_type": "code", "source": text}


EXERCISE_A = _md(":::{exercise}\n:label: ex-a\n\nCompute it.\n:::\n")


@pytest.mark.parametrize("cells, problem", [
    ([EXERCISE_A, _md(":::{solution} ex-a\n:class: dropdown\n\n```python\nprint(1)\n```\n:::\n")], "never runs"),
    ([EXERCISE_A, _md(":::{solution} ex-a\n\nIt is\n\n    print(1)\n:::\n")], "never runs"),
    ([EXERCISE_A, _md("```{solution-start} ex-a\n```\nText."), _md("```{solution-end}\n```")], "no code cell"),
    ([EXERCISE_A, _md("```{solution-start} ex-a\n```\n"), _code_cell("x = 1")], "no solution-end"),
    ([EXERCISE_A, _md("```{solution-start} ex-a\n```\n"), _md("```python\nx = 1\n```"), _code_cell("x = 1"),
      _md("```{solution-end}\n```")], "never runs"),
    ([EXERCISE_A], "has no solution"),
    ([EXERCISE_A, _md(":::{solution} ex-b\nText.\n:::\n")], "answers no exercise"),
    ([_md("```{exercise}\n:label: ex-a\nDo.\n```\n"), _md(":::{solution} ex-a\nText.\n:::\n")], "::: blocks"),
])
def test_the_solution_check_catches(cells, problem):
    assert any(problem in p for p in solution_problems(cells)), solution_problems(cells)


def test_the_solution_check_accepts_executed_and_prose_solutions():
    cells = [EXERCISE_A, _md("```{solution-start} ex-a\n:class: dropdown\n```\nWe compute:"), _code_cell("x = 1"),
             _md("```{solution-end}\n```"), _md(":::{exercise}\n:label: ex-b\nWhy?\n:::\n"),
             _md(":::{solution} ex-b\n:class: dropdown\n\n1. Because\n   of $x$.\n:::\n")]
    assert solution_problems(cells) == []
