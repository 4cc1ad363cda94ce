#!/usr/bin/env bash
# Run every test: library tests, notebook hygiene, every notebook executed (nbval), and the
# browser test on the built HTML (so the book is built first). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/book.sh
VENV=${LIGHTLM_VENV:-$(pwd)/.venv}
export PATH="$VENV/bin:$PATH"
printf '\n== running the tests (pytest)\n'
# One process: the notebooks time things, and two workers of two torch threads each on two cores would
# oversubscribe the CPU and distort those timings.
python -m pytest tests notebooks --nbval-lax "$@"
