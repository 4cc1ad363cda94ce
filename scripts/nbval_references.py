"""Write the notebooks as the book build executed them, with the outputs the book shows, for nbval to compare.

Jupyter Book (``execute_notebooks: cache``) keeps each executed notebook in its jupyter-cache,
``_build/.jupyter_cache``. It also writes a copy under ``_build/jupyter_execute/``, but with outputs only when it
executed the notebook in that very build: a notebook served from the cache is written there without outputs
(myst-nb 1.4.0), and nbval compares nothing in a cell that has no execution count. So the references come from
the cache: each notebook of ``notebooks/`` merged with the outputs cached for its exact code, written to
``_build/nbval/notebooks/`` (pytest's norecursedirs keeps ``_build`` out of a plain run). A notebook whose
current code the build did not execute is an error: build the book first.

    python scripts/nbval_references.py      # prints the folder it wrote; scripts/test.sh runs nbval on it
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nbformat
from jupyter_cache import get_cache

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    build = ROOT / "_build"
    cache_dir, out = build / ".jupyter_cache", build / "nbval" / "notebooks"
    if not cache_dir.is_dir():
        print(f"nbval_references: no jupyter-cache at {cache_dir}: build the book first (bash scripts/book.sh)",
              file=sys.stderr)
        return 1
    cache = get_cache(cache_dir)
    shutil.rmtree(out, ignore_errors=True)  # no stale reference from a notebook that is gone
    out.mkdir(parents=True)
    problems, cells, outputs = [], 0, 0
    sources = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for source in sources:
        notebook = nbformat.read(source, as_version=4)
        try:
            _, executed = cache.merge_match_into_notebook(notebook)
        except KeyError:
            problems.append(f"{source.name}: the build did not execute this version of it (no match in "
                            f"{cache_dir.relative_to(ROOT)}): build the book (bash scripts/book.sh)")
            continue
        code = [c for c in executed.cells if c.cell_type == "code" and c.source.strip()]
        unrun = [i for i, c in enumerate(code) if c.execution_count is None]
        if unrun:  # nbval would compare nothing there
            problems.append(f"{source.name}: code cells {unrun} have no execution count in the cached notebook")
        cells += len(code)
        outputs += sum(len(c.outputs) for c in code)
        nbformat.write(executed, out / source.name)
    if problems:
        print("nbval_references:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"nbval_references: {len(sources)} notebooks, {cells} code cells, {outputs} outputs -> "
          f"{out.relative_to(ROOT)}", file=sys.stderr)
    print(out.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
