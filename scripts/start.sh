#!/usr/bin/env bash
# Set everything up and start the application on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec ultrarefiner start "$@"
