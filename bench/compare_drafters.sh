#!/usr/bin/env bash
# The drafter comparison of issue 4 on one machine, one job at a time (timings are only comparable
# within one `draftsmith eval`, which interleaves AR and SD per prompt).
#   bash bench/compare_drafters.sh [NUM_HUMANEVAL]
# Needs the trained quick runs: runs/small_lm-kd-quick, runs/eagle-kd-quick, runs/eagle3-ttt-quick
# (each 532 steps x 4 x 256 tokens: `draftsmith train smollm2-135m/<recipe>-quick train.max_steps=532
# train.max_minutes=null`). Prints one table at the end (bench/drafter_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."
N_HE=${1:-40}
DS=".venv/bin/draftsmith"
EVAL=(--target smollm2-135m-instruct --k 4 --max-new-tokens 128 --temperature 0 --no-hf-assisted --overwrite)
for run in eagle3-ttt-quick eagle-kd-quick; do
  [ -d runs/$run/speculators ] || $DS export runs/$run --format speculators --out runs/$run/speculators
done
declare -A DRAFTER=([eagle3]=runs/eagle3-ttt-quick/speculators [eagle]=runs/eagle-kd-quick/speculators
                    [small_lm]=runs/small_lm-kd-quick/export [prompt_lookup]=prompt-lookup)
OUTS=()
for name in eagle3 eagle small_lm prompt_lookup; do
  for bench in mt_bench humaneval; do
    n=80; [ "$bench" = humaneval ] && n=$N_HE
    out=runs/compare/$name-$bench$n
    [ -f $out/report.json ] || $DS eval --drafter "${DRAFTER[$name]}" --bench $bench --num-prompts $n "${EVAL[@]}" --out $out
    OUTS+=($out)
  done
done
.venv/bin/python bench/drafter_table.py "${OUTS[@]}"
