#!/usr/bin/env bash
# GPU checks in one go (used on the lent H100/H200 machine; any CUDA box works):
#   1. the `gpu`-marked tests; 2. `draftsmith eval` in bf16 on MT-bench first turns.
# Usage: bash bench/gpu_eval.sh TARGET(.gguf|folder|asset) MT_BENCH(name|file.jsonl) OUT_DIR [NUM_PROMPTS]
set -uo pipefail
TARGET=$1; BENCH=$2; OUT=$3; N=${4:-80}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pytest -q -m gpu tests/test_slow_gpu.py -p no:cacheprovider 2>&1 | tail -3
python -m draftsmith.cli eval --target "$TARGET" --drafter prompt-lookup --bench "$BENCH" --num-prompts "$N" \
  --max-new-tokens 96 --temperature 0 --dtype bf16 --device cuda --out "$OUT/prompt-lookup-bf16" --overwrite 2>&1 \
  | grep -v "prompts:"
