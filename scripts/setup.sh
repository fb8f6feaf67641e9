#!/usr/bin/env bash
# Set everything up and build the book: environment, then execute every chapter with papermill
# (profile cpu: the embedded toy model, offline) and build the static site into _build/html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
.venv/bin/python -m clipdecomp.book build --profile "${PROFILE:-cpu}"
