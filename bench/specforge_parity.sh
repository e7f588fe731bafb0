#!/usr/bin/env bash
# Reference parity for EAGLE-3 (issue 18): SpecForge 0.2.0 and draftsmith train the same head on the same
# prepared rows in the same order (bench/specforge_parity.py says how), then the SpecForge head's SGLang
# export is checked against SpecForge's own forward and both heads get the same held-out figures.
#
#   bash bench/specforge_parity.sh OUT [STEPS] [recipe overrides ...]
#   bash bench/specforge_parity.sh /tmp/parity                                   # the quick recipe's 600 steps
#   bash bench/specforge_parity.sh /tmp/parity-smoke 5 train.warmup_steps=2      # a smoke
#
# Environment: RECIPE (default smollm2-135m/eagle3-ttt-quick), DATA (prepared rows, default OUT/data;
# made with `draftsmith data prepare` when missing), SF_PY (SpecForge's venv python, default
# /work/specforge-venv/bin/python; bench/results/specforge-parity/README.md has its install recipe),
# SF_ARGS (extra arguments of the SpecForge stage: --dtype float32, --vocab draftsmith, --max-grad-norm 1.0,
# --compile), VARIANTS (more draftsmith trainings on the same plan, "name:override override;name:..." e.g.
# "draftsmith-fkl:loss.name=forward_kl loss.position_weights=null": SpecForge's loss and 0.8^i steps),
# OMP_NUM_THREADS (default 1 here: both trainers get the same threads; run on a quiet machine
# for timings). The two trainings run one after the other, never side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/specforge_parity.sh OUT [STEPS] [recipe overrides ...]}
STEPS=${2:-600}
shift $(( $# < 2 ? $# : 2 ))
RECIPE=${RECIPE:-smollm2-135m/eagle3-ttt-quick}
DATA=${DATA:-$OUT/data}
SF_PY=${SF_PY:-/work/specforge-venv/bin/python}
DS=.venv/bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OVERRIDES=(train.max_steps="$STEPS" "$@")

[ -f "$DATA/meta.json" ] || "$DS/draftsmith" data prepare "$RECIPE" --out "$DATA"
"$DS/python" bench/specforge_parity.py plan --recipe "$RECIPE" --data "$DATA" --out "$OUT" "${OVERRIDES[@]}"
# shellcheck disable=SC2086
"$SF_PY" bench/specforge_parity.py train --out "$OUT" ${SF_ARGS:-}
HEADS=()
IFS=';' read -ra RUNS <<< "draftsmith:${VARIANTS:+;$VARIANTS}"
for spec in "${RUNS[@]}"; do
    [ -n "$spec" ] || continue
    name=${spec%%:*}
    read -ra extra <<< "${spec#*:}"
    "$DS/draftsmith" train "$RECIPE" data.source="$DATA" run.out_dir="$OUT" run.name="$name" \
        eval.every="$STEPS" checkpoint.every="$STEPS" log.tensorboard=false "${OVERRIDES[@]}" "${extra[@]}" --overwrite
    "$DS/draftsmith" export "$OUT/$name" --format sglang --out "$OUT/$name-sglang" --overwrite
    HEADS+=(--draftsmith-head "$OUT/$name-sglang")
done
"$DS/python" bench/specforge_parity.py verify --out "$OUT" "${HEADS[@]}"
