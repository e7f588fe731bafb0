#!/usr/bin/env bash
# Issue 18's objective bake-off: the EAGLE-3 head of smollm2-135m/eagle3-ttt-quick trained at equal tokens
# (same data, order, seed, schedule) with each objective, then evaluated greedy with `draftsmith eval`
# (MT-bench and HumanEval, k = 4 and --k auto) and tabled by bench/objective_table.py.
#
#   bash bench/objective_bakeoff.sh                      # the quick recipe's full budget (600 steps)
#   STEPS=150 JOBS=2 MT=40 HE=20 bash bench/objective_bakeoff.sh   # a reduced budget, two runs at a time
#
# Settings are NAME:OVERRIDES (overrides separated by spaces); SETTINGS="..." replaces the list, and
# MUON=NAME adds NAME trained with train.optimizer=muon (run it after the first pass picks the best).
# Runs go to $OUT/<name>/ (default runs/bakeoff); a finished run or report is reused, never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
OUT="${OUT:-runs/bakeoff}"
STEPS="${STEPS:-600}"
JOBS="${JOBS:-1}"
MT="${MT:-80}"
HE="${HE:-40}"
KS="${KS-4 auto}"
NEW="${NEW:-64}"
RECIPE=smollm2-135m/eagle3-ttt-quick
# every setting names its whole objective, so a recipe default never leaks into another setting
DEFAULT_SETTINGS="forward_kl:loss.name=forward_kl loss.mix=null loss.position_weights=null
tvd:loss.name=tvd loss.mix=null loss.position_weights=null
nla:loss.name=nla loss.mix=null loss.position_weights=null
lk_hybrid:loss.name=lk_hybrid loss.mix=null loss.position_weights=null
ce0.1-tvd0.9:loss.mix={\"ce\":0.1,\"tvd\":0.9} loss.position_weights=null
lk_hybrid-reach:loss.name=lk_hybrid loss.mix=null loss.position_weights=reach
lk_hybrid-accepted_length:loss.name=lk_hybrid loss.mix=null loss.position_weights=accepted_length"
SETTINGS="${SETTINGS:-$DEFAULT_SETTINGS}"
if [ -n "${MUON:-}" ]; then
  base=$(printf '%s\n' "$SETTINGS" | grep "^${MUON}:" | cut -d: -f2-)
  [ -n "$base" ] || { echo "MUON=$MUON is not one of the settings" >&2; exit 2; }
  SETTINGS="${MUON}-muon:${base} train.optimizer=muon"
fi
mkdir -p "$OUT"
threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=$threads

one() {   # NAME OVERRIDES...: train, export, evaluate
  local name=$1; shift
  local run="$OUT/$name"
  if [ ! -f "$run/summary.json" ]; then
    local resume=(); [ -d "$run/checkpoints" ] && resume=(--resume)
    draftsmith train "$RECIPE" "$@" "train.max_steps=$STEPS" "run.out_dir=$OUT" "run.name=$name" "${resume[@]}" \
      > "$OUT/$name.train.log" 2>&1
  fi
  [ -d "$run/speculators" ] || draftsmith export "$run" --format speculators --out "$run/speculators" > /dev/null
  for k in $KS; do
    for bench in "mt_bench $MT" "humaneval $HE"; do
      set -- $bench
      local report="$run/eval-$1$2-k$k"
      [ -f "$report/report.json" ] || draftsmith eval --target smollm2-135m-instruct --drafter "$run/speculators" \
        --bench "$1" --num-prompts "$2" --max-new-tokens "$NEW" --k "$k" --temperature 0 --no-hf-assisted \
        --device cpu --out "$report" > "$report.log" 2>&1
    done
  done
  echo "[bakeoff] $name done"
}

while IFS= read -r line; do
  [ -n "$line" ] || continue
  name=${line%%:*}; overrides=${line#*:}
  # shellcheck disable=SC2086
  one "$name" $overrides &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
done <<< "$SETTINGS"
wait
python bench/objective_table.py "$OUT" | tee "$OUT/table.md"
