#!/usr/bin/env bash
# Issue 19's CPU table: the block drafters (dflash-quick, dspark-quick) beside eagle3-ttt-quick at equal
# training tokens, in ONE decode profile per benchmark (bench/decode_profile.py: plain decoding once per
# prompt, every drafter and draft length on the same prompt right after it; τ, α1..α4, drafter forwards
# and draft ms per step, tokens/s and speedup, lossless), greedy, 64 new tokens; then `draftsmith eval`
# of dspark at --k auto on MT-bench for the report's reliability table (predicted vs measured α).
#
#   bash bench/block_drafters.sh                        # trains what is missing (600 steps each), then measures
#   RUNS=/work/block STEPS=600 bash bench/block_drafters.sh
#
# Runs go to $RUNS/<recipe>/ (default runs/blocks); a finished run is reused. Trainings run JOBS at a time
# with OMP_NUM_THREADS = cores / JOBS; the measurements run alone on every core (run them on a quiet machine).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
RUNS="${RUNS:-runs/blocks}"
STEPS="${STEPS:-600}"
JOBS="${JOBS:-3}"
MT="${MT:-80}"
HE="${HE:-40}"
NEW="${NEW:-64}"
KS="${KS:-1,2,4,auto}"
RECIPES="${RECIPES:-dflash-quick dspark-quick eagle3-ttt-quick}"
OUT="${OUT:-$RUNS/table}"
CKPT="step-$(printf %07d "$STEPS")"
mkdir -p "$RUNS" "$OUT"
threads=$(( $(nproc) / JOBS )); [ "$threads" -ge 1 ] || threads=1
pids=()
for r in $RECIPES; do
  if [ -d "$RUNS/$r/checkpoints/$CKPT" ]; then continue; fi
  resume=(); [ -d "$RUNS/$r/checkpoints" ] && resume=(--resume)
  OMP_NUM_THREADS=$threads draftsmith train "smollm2-135m/$r" "train.max_steps=$STEPS" "run.out_dir=$RUNS" \
    "run.name=$r" "${resume[@]}" > "$RUNS/$r.train.log" 2>&1 &
  pids+=($!)
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 10; done
done
for p in "${pids[@]}"; do wait "$p"; done
drafters=()
for r in $RECIPES; do drafters+=(--drafter "$RUNS/$r/checkpoints/$CKPT/drafter"); done
export OMP_NUM_THREADS=$(nproc)
python bench/decode_profile.py "${drafters[@]}" --bench mt_bench --num-prompts "$MT" --max-new-tokens "$NEW" \
  --k "$KS" | tee "$OUT/mt_bench$MT.txt"
python bench/decode_profile.py "${drafters[@]}" --bench humaneval --num-prompts "$HE" --max-new-tokens "$NEW" \
  --k "$KS" | tee "$OUT/humaneval$HE.txt"
if [ -d "$RUNS/dspark-quick/checkpoints/$CKPT" ]; then
  draftsmith eval --target smollm2-135m-instruct --drafter "$RUNS/dspark-quick/checkpoints/$CKPT/drafter" \
    --bench mt_bench --num-prompts "$MT" --max-new-tokens "$NEW" --k auto --no-hf-assisted \
    --out "$OUT/dspark-eval-mt_bench$MT-kauto" --overwrite | tail -5
fi
