#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent: a no-op when pyproject.toml
# is unchanged since the last successful install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat .venv/.clipdecomp-installed 2>/dev/null)" != "$stamp" ]; then
  # plain pip (not uv/poetry): it takes the pinned torch wheels from local disk where they exist
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[book,test]"
  echo "$stamp" > .venv/.clipdecomp-installed
fi
