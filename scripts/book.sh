#!/usr/bin/env bash
# Build the whole book, notebooks executed, into _build/html. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${LIGHTLM_VENV:-$(pwd)/.venv}
export PATH="$VENV/bin:$PATH"
printf '\n== building the book (jupyter-book build . -W -n --keep-going)\n'
t0=$SECONDS
jupyter-book build . -W -n --keep-going "$@"
echo "   book built in $((SECONDS - t0)) s: preview with  python -m http.server -d _build/html"
