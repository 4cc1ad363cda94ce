"""nbval in strict mode bites: a printed number that does not reproduce fails, and the sanitize file hides only
what honestly varies.

``scripts/test.sh`` re-executes the notebooks as the book build executed them (``_build/nbval/notebooks/``,
written by ``scripts/nbval_references.py``) with ``--nbval``, ``--nbval-sanitize-with tests/nbval_sanitize.cfg``
and ``-p tests.nbval_plugin``, and compares every output with the build's. Here a small notebook whose stored
outputs play the build's is run the same way, by pytest and nbval in a subprocess with a kernel from this
environment, and each cell's outcome is read from a JUnit XML report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import get_sanitize_patterns

ROOT = Path(__file__).resolve().parents[1]
SANITIZE = Path(__file__).with_name("nbval_sanitize.cfg")

# (what the case shows, the cell's source, the output stored as the build's, the outcome nbval must give)
CASES = [
    ("a number that reproduces passes", 'print("accuracy 0.5")', "accuracy 0.5\n", "passed"),
    ("a number that does not reproduce fails", 'print("accuracy 0.6")', "accuracy 0.5\n", "failed"),
    ("a table value that does not reproduce fails", 'from IPython.display import Markdown\n'
     'Markdown("| model | accuracy |\\n|---|---|\\n| student | 0.81 |")', "| model | accuracy |\n|---|---|\n"
     "| student | 0.80 |", "failed"),
    ("a wall time beside a loss: the time is sanitized",
     'print("1500 steps of 32 x 128 bytes in 31.0 s (48 steps/s); held-out loss 1.732 nats")',
     "1500 steps of 32 x 128 bytes in 12.5 s (120 steps/s); held-out loss 1.732 nats\n", "passed"),
    ("a wall time beside a loss: the loss is not",
     'print("1500 steps of 32 x 128 bytes in 12.5 s (120 steps/s); held-out loss 1.733 nats")',
     "1500 steps of 32 x 128 bytes in 12.5 s (120 steps/s); held-out loss 1.732 nats\n", "failed"),
    ("stderr is compared too", 'import sys\nprint("warning: 3 NaNs", file=sys.stderr)', "warning: 2 NaNs\n",
     "failed"),
    # the build (nbclient) shows nothing for a cell ending in ';'; nor does nbval with tests/nbval_plugin.py
    ("a trailing ';' silences the cell's value, as in the build", "x = 2\nx + 1;", None, "passed"),
    # last: it kills the kernel; tests/nbval_plugin.py notices at once instead of after the cell timeout
    ("a kernel that dies fails its cell", "import os\nos._exit(1)", None, "failed"),
]
CELL_TIMEOUT_S = 120


def _notebook(path: Path) -> None:
    cells = []
    for count, (_, source, stored, _) in enumerate(CASES, start=1):
        if stored is None:
            cells.append(nbformat.v4.new_code_cell(source, execution_count=count, outputs=[]))
            continue
        if "Markdown(" in source:
            output = nbformat.v4.new_output("execute_result", execution_count=count, data={
                "text/markdown": stored, "text/plain": "<IPython.core.display.Markdown object>"})
        else:
            output = nbformat.v4.new_output("stream", name="stderr" if "stderr" in source else "stdout", text=stored)
        cells.append(nbformat.v4.new_code_cell(source, execution_count=count, outputs=[output]))
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str]:
    """Run nbval strict (as scripts/test.sh does) on a notebook of CASES; the outcome of each cell, by case."""
    tmp = tmp_path_factory.mktemp("nbval")
    _notebook(tmp / "strict.ipynb")
    (tmp / "pytest.ini").write_text("[pytest]\n")  # this project's pyproject.toml stays out of it
    report = tmp / "report.xml"
    start = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(tmp / "pytest.ini"), "--rootdir", str(tmp), "-p", "no:cacheprovider",
         "-p", "tests.nbval_plugin", "--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE),
         "--nbval-cell-timeout", str(CELL_TIMEOUT_S), f"--junitxml={report}", "strict.ipynb"],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    assert report.is_file(), f"pytest wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr}"
    result = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        index = int(re.fullmatch(r"Cell (\d+)", case.get("name")).group(1))
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        result[CASES[index][0]] = outcome
    assert len(result) == len(CASES), f"{len(result)} cells reported for {len(CASES)} cases:\n{proc.stdout[-3000:]}"
    result["seconds"] = seconds
    return result


@pytest.mark.parametrize("case, expected", [(c[0], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_nbval_strict_compares_outputs(outcomes, case, expected):
    assert outcomes[case] == expected


def test_a_dead_kernel_does_not_wait_for_the_cell_timeout(outcomes):
    # nbval alone would wait CELL_TIMEOUT_S for the dead kernel's reply; the whole run takes seconds otherwise
    assert outcomes["seconds"] < CELL_TIMEOUT_S, f"the run took {outcomes['seconds']:.0f} s"


def test_every_rule_of_the_sanitize_file_is_read_and_compiles():
    text = SANITIZE.read_text(encoding="utf-8")
    # nbval reads a rule only as a "regex: " line followed at once by a "replace: " line; anything else is
    # silently ignored, so a typo would switch a rule off.
    lines = [line for line in text.splitlines() if line.startswith(("regex:", "replace:"))]
    rules = get_sanitize_patterns(text)
    assert rules and len(rules) * 2 == len(lines), f"{len(lines)} regex/replace lines, {len(rules)} rules read"
    assert len({regex for regex, _ in rules}) == len(rules), "a regex twice: nbval keeps only the last"
    for regex, _ in rules:
        re.compile(regex)
    # each rule has a comment saying why (a '#' line right above its [section] or its regex line)
    blocks = re.split(r"\n\s*\n", text)
    for block in blocks:
        if "regex:" in block:
            assert re.search(r"^#", block, re.M), f"a rule without a comment saying why:\n{block}"
