#!/usr/bin/env bash
# Run every test: library, notebook execution (profile ci), strict book build, and the site in a
# headless browser (Debian's chromium, installed here when missing and running as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
exec .venv/bin/python -m pytest "$@"
