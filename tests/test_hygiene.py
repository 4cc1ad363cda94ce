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
