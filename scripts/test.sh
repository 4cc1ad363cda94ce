#!/usr/bin/env bash
# Run the tests. Installs what it needs first.
#
#   bash scripts/test.sh [PYTEST_ARGS...]         every test: library tests, notebook hygiene, every notebook
#                                                 executed (nbval), and the browser test on the built HTML (so
#                                                 the book is built first)
#   bash scripts/test.sh --lib [PYTEST_ARGS...]   the library tests and notebook hygiene only, a few minutes:
#                                                 Python environment only (no npm, no artefacts, no book build),
#                                                 and no test marked slow (those that load a real model or
#                                                 build an artefact: see tests/conftest.py) or browser
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LIGHTLM_VENV:-$(pwd)/.venv}

if [ "${1:-}" = "--lib" ]; then
  shift
  bash scripts/setup.sh --python-only
  export PATH="$VENV/bin:$PATH"
  printf '\n== running the library tests (pytest tests -m "not slow and not browser")\n'
  t0=$SECONDS
  status=0
  python -m pytest tests -m "not slow and not browser" "$@" || status=$?
  echo "   library tests ran in $((SECONDS - t0)) s"
  exit "$status"
fi

bash scripts/book.sh
export PATH="$VENV/bin:$PATH"
# setup.sh has warmed every artefact: a test that finds one cold or stale fails instead of skipping.
export LIGHTLM_REQUIRE_ARTEFACTS=1
printf '\n== running the tests (pytest)\n'
# One process: the notebooks time things, and two workers of two torch threads each on two cores would
# oversubscribe the CPU and distort those timings.
status=0
python -m pytest tests "$@" || status=$?
# nbval, strict: re-execute every notebook the book build executed and compare every output with the build's
# (the references are the build's own executed notebooks, from its jupyter-cache). Outputs that honestly vary
# (wall times, ratios of them, a kernel's process id) are rewritten by tests/nbval_sanitize.cfg, each rule with
# its reason; any other printed number that does not reproduce fails.
printf '\n== re-executing the notebooks and comparing their outputs with the build (nbval, strict)\n'
t0=$SECONDS
references=$(python scripts/nbval_references.py)
python -m pytest -p no:cacheprovider -p tests.nbval_plugin "$references" --nbval --nbval-current-env \
  --nbval-sanitize-with tests/nbval_sanitize.cfg "$@" || status=$?
echo "   notebooks re-executed and compared in $((SECONDS - t0)) s"
exit "$status"
