#!/usr/bin/env bash
# Set up (once), then run the test suite. Extra arguments go to pytest (e.g. -m slow, -m gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m pytest -q "$@"
