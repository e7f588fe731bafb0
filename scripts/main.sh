#!/usr/bin/env bash
# The main job on the embedded default: set up (once), train the quick recipe (SmolLM2-135M-Instruct
# target, 4-layer small_lm drafter, ShareGPT; ~15 min on 2 CPU cores), export the drafter, and
# evaluate it on MT-bench first turns against plain decoding and transformers' assisted generation.
# Extra arguments go to `draftsmith eval` (e.g. --num-prompts 80). A finished run is reused: pass
# DRAFTSMITH_RETRAIN=1 to train again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
RUN=runs/small_lm-kd-quick
if [ -n "${DRAFTSMITH_RETRAIN:-}" ] || [ ! -f "$RUN/summary.json" ]; then
  if [ -d "$RUN/checkpoints" ] && [ -z "${DRAFTSMITH_RETRAIN:-}" ]; then
    draftsmith train smollm2-135m/small_lm-kd-quick --resume        # an interrupted run continues
  else
    draftsmith train smollm2-135m/small_lm-kd-quick --overwrite
  fi
fi
draftsmith export "$RUN" --format hf --out "$RUN/export" --overwrite
draftsmith eval --target smollm2-135m-instruct --drafter "$RUN/export" --bench mt_bench --num-prompts 20 \
  --max-new-tokens 128 --k 4 --temperature 0 --out "$RUN/eval" --overwrite "$@"
