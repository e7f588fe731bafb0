#!/usr/bin/env bash
# The main job on the embedded default: set up (once), then evaluate prompt lookup drafting for the
# SmolLM2-135M-Instruct target on MT-bench. Extra arguments go to `draftsmith eval`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
draftsmith eval --target smollm2-135m-instruct --drafter prompt-lookup --bench mt_bench \
  --num-prompts 8 --max-new-tokens 96 --temperature 0 --out runs/eval-smollm2-prompt-lookup --overwrite "$@"
