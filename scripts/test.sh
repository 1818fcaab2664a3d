#!/usr/bin/env bash
# Set everything up and run the whole test suite (lint included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# The browser tests drive Debian's Chromium (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will be skipped"
  else
    echo "warning: chromium is not installed; browser tests will be skipped"
  fi
fi
ruff check .
ruff format --check . || { echo "run 'ruff format .' to fix formatting"; exit 1; }
python -m pytest -q -p no:cacheprovider "$@"
