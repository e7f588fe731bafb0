#!/usr/bin/env bash
# Decode with every head of a parity run (bench/specforge_parity.sh: OUT/specforge-sglang, OUT/draftsmith-sglang
# and the VARIANTS' OUT/<name>-sglang) in ONE decode profile per benchmark (bench/decode_profile.py: plain
# decoding once per prompt, every head and draft length right after it on the same prompt): τ, α1..α4, tokens/s
# and speedup against that plain decoding, lossless. Greedy, 64 new tokens; run it alone on a quiet machine.
#
#   bash bench/specforge_parity_eval.sh runs/parity-600            # MT-bench 80 and HumanEval 40, k = 4 and auto
#   MT=8 HE=0 KS=4 bash bench/specforge_parity_eval.sh /tmp/parity-smoke
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash bench/specforge_parity_eval.sh OUT}
MT=${MT:-80}
HE=${HE:-40}
KS=${KS:-4,auto}
NEW=${NEW:-64}
heads=()
for folder in "$OUT"/specforge-sglang "$OUT"/*-sglang; do
    case " ${heads[*]} " in *" $folder "*) continue ;; esac
    [ -f "$folder/config.json" ] && heads+=(--drafter "$folder")
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
for run in "mt_bench $MT" "humaneval $HE"; do
    read -r bench n <<< "$run"
    [ "$n" -gt 0 ] || continue
    .venv/bin/python bench/decode_profile.py "${heads[@]}" --bench "$bench" --num-prompts "$n" \
        --max-new-tokens "$NEW" --k "$KS" | tee "$OUT/decode-$bench$n.txt"
done
