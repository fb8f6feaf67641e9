#!/usr/bin/env bash
# Run every test: library tests, notebook execution (profile ci) and the strict book build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest "$@"
