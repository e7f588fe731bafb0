#!/usr/bin/env bash
# Issue 20's table: plain vs speculative decoding at batch sizes 1, 4 and 16, fp32 and bf16, on this machine,
# with the main job's drafter (prompt lookup + the eagle3-cpu-quick head as one tree, --k auto), greedy, on
# MT-bench first turns, eager and with --compile (static cache + compiled forward, batched rows included:
# models/static_rows.py) in each dtype.
# Every setting is one `draftsmith eval` run (plain and speculative decoding of the same prompts in that run);
# bench/batched_table.py prints the table from their reports.
#
#   bash bench/batched_decoding.sh                          # MT-bench 80, 64 new tokens (the issue's table)
#   N=10 NEW=32 OUT=/tmp/bt bash bench/batched_decoding.sh  # a quick look
#   PATHS=eager DTYPES=fp32 OUT=... bash bench/batched_decoding.sh   # only the batched fp32 run
#
# Needs the main job's head (bash scripts/main.sh trains and exports it). Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
N="${N:-80}"
NEW="${NEW:-64}"
OUT="${OUT:-bench/results/cpu-batched-decoding}"
HEAD="${HEAD:-runs/eagle3-cpu-quick/speculators}"
DTYPES="${DTYPES:-fp32 bf16}"
PATHS="${PATHS:-eager compiled}"    # eager, or --compile; batch sizes 1, 4 and 16 each
TREE="${TREE:-dynamic:8,2,3}"       # the main job's tree when the batched tables were measured; TREE=none for chains
[ -d "$HEAD" ] || { echo "no drafter at $HEAD: run bash scripts/main.sh first (or set HEAD=)" >&2; exit 2; }
mkdir -p "$OUT"
run() {   # NAME ARGS...
  local name=$1; shift
  [ -f "$OUT/$name/report.json" ] || draftsmith eval --target smollm2-135m-instruct --drafter "prompt-lookup+$HEAD" \
    --bench mt_bench --num-prompts "$N" --max-new-tokens "$NEW" --k auto --temperature 0 --no-hf-assisted \
    --tree "$TREE" --device cpu --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "[batched] $name done"
}
for path in $PATHS; do
  for dtype in $DTYPES; do
    case $path in
      eager) run "$dtype-eager" --dtype "$dtype" --batch-size 1,4,16 ;;
      compiled) run "$dtype-compiled" --dtype "$dtype" --batch-size 1,4,16 --compile ;;
    esac
  done
done
python bench/batched_table.py "$OUT" | tee "$OUT/table.md"
