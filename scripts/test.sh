#!/usr/bin/env bash
# Set everything up and run the whole test suite (lint included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
# The browser tests drive Debian's Chromium (no browser download); the DICOM SEG tests run
# DICOM's validator dciodvfy (Debian's dicom3tools).
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "warning: could not install ${missing[*]}; the tests that need them will say so"
  else
    echo "warning: ${missing[*]} not installed; the tests that need them will say so"
  fi
fi
ruff check .
ruff format --check . || { echo "run 'ruff format .' to fix formatting"; exit 1; }
python -m pytest -q -p no:cacheprovider "$@"
