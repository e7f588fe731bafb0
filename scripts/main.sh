#!/usr/bin/env bash
# The main job on the embedded default: set up (once), train the EAGLE-3 head for CPU decoding
# (recipes/smollm2-135m/eagle3-cpu-quick.yaml: SmolLM2-135M-Instruct target, ShareGPT, a 2-step
# training-time test, a budget of 800 steps x 4 x 256 tokens, ~15-25 min on 2 quiet CPU cores),
# export the head in vLLM's speculators format, and evaluate it on MT-bench first turns against plain
# decoding and transformers' assisted generation (its prompt lookup). The drafter is the trained head
# and prompt lookup as one tree (--drafter prompt-lookup+HEAD); --k auto sizes every step's draft from
# the target's measured cost curve. The head drafts a small tree (--tree dynamic:8,4,6: its 4 best first
# tokens, a level deeper only where that pays, 6 nodes at most; prompt lookup keeps its chains up to 8): on
# this CPU a bf16 verify of up to 6 tokens costs what one does, and the head's lower-ranked first tokens are
# accepted where no second drafting round is paid for (dynamic:8,4,6 1.51x / 1.52x vs dynamic:8,2,3's 1.46x /
# 1.47x in two profiles, τ 2.03 vs 1.88: bench/results/cpu-tree-exactness; chains 1.23x vs dynamic:8,2,3's 1.28x
# on the Intel host before: bench/results/cpu-main-ceiling). The target runs
# compiled (--compile: a static KV cache and an inductor graph, 1-2 min to build once; its linear layers on the
# kernel measured fastest on this CPU, models/cpu_linear.py) in bf16, plain and speculative decoding alike: on a CPU
# every row of a verified chain then has plain decoding's logits bit for bit (models/row_attention.py) and a tree's
# off-chain rows up to rounding (bench/results/cpu-tree-exactness, cpu-avx2): lossless up to near-ties, every
# divergence audited in the report. bf16 is the fastest plain decoding on every CPU measured: natively on an AMD EPYC
# with AVX512-BF16 (a forward 26 ms vs fp32's 37), and on an AVX2 EPYC through draftsmith's row kernel (bf16 weights,
# fp32 arithmetic, models/row_kernel.py: a forward 29-30 ms at 1-2 tokens vs fp32's 50-73; bench/results/cpu-avx2).
# --plain-dtypes fp32 times plain decoding of the same prompts in fp32 too: the report names the fastest plain
# decoding and the speedup over it.
# Extra arguments go to `draftsmith eval` (e.g. --num-prompts 80). A finished run is reused: pass
# DRAFTSMITH_RETRAIN=1 to train again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
RECIPE=smollm2-135m/eagle3-cpu-quick
RUN=runs/eagle3-cpu-quick
if [ -n "${DRAFTSMITH_RETRAIN:-}" ] || [ ! -f "$RUN/summary.json" ]; then
  if [ -d "$RUN/checkpoints" ] && [ -z "${DRAFTSMITH_RETRAIN:-}" ]; then
    draftsmith train "$RECIPE" --resume        # an interrupted run continues
  else
    draftsmith train "$RECIPE" --overwrite
  fi
fi
draftsmith export "$RUN" --format speculators --out "$RUN/speculators" --overwrite
draftsmith eval --target smollm2-135m-instruct --drafter "prompt-lookup+$RUN/speculators" --bench mt_bench \
  --num-prompts 20 --max-new-tokens 128 --k auto --tree dynamic:8,4,6 --temperature 0 --dtype bf16 --plain-dtypes fp32 --compile --out "$RUN/eval" \
  --overwrite "$@"
