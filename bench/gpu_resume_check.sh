#!/usr/bin/env bash
# Resume under DeepSpeed ZeRO-2 and FSDP2 on one lent GPU: the checkpoints whose optimizer state the
# engines write themselves (accelerate/), read back with every torch.load forced to weights_only.
# Per config: train 4 steps (checkpoints 2 and 4), copy the run without step 4, --resume it, and
# compare its step-4 drafter with the uninterrupted one.
#
# Here, once: a tiny target, prepared data and a recipe in runs/gpucheck-assets/ (see the session
# notes of issue 9; any tiny target folder + `draftsmith data prepare` output + recipe will do).
# There (carry runs/gpucheck-assets): bash bench/gpu_resume_check.sh   [CONFIGS="deepspeed_zero2 fsdp"]
set -uo pipefail
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/pkg
OUT=${OUT:-/tmp/out}
W=/tmp/gpucheck
A=runs/gpucheck-assets
mkdir -p /tmp/pkg $W "$OUT"
ln -sfn "$PWD" /tmp/pkg/draftsmith
python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__, torch.cuda.get_device_name())"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
for cfg in ${CONFIGS:-deepspeed_zero2 fsdp}; do
  launch=(python3 -m accelerate.commands.launch --config_file recipes/accelerate/$cfg.yaml --num_processes ${NPROC:-1}
          -m draftsmith.cli train $A/recipe.yaml run.out_dir=$W/runs)
  "${launch[@]}" run.name=$cfg > "$OUT/$cfg.log" 2>&1
  echo "$cfg: train rc=$?"
  rm -rf $W/runs/$cfg-r && cp -r $W/runs/$cfg $W/runs/$cfg-r && rm -rf $W/runs/$cfg-r/checkpoints/step-0000004
  "${launch[@]}" run.name=$cfg-r --resume > "$OUT/$cfg-resume.log" 2>&1
  echo "$cfg: resume rc=$?"
  grep -h -E "resumed from|error|Error" "$OUT/$cfg-resume.log" | grep -v Warning | head -5
  python3 - "$W/runs/$cfg" "$W/runs/$cfg-r" <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
a, b = (Path(p) / "checkpoints" / "step-0000004" for p in sys.argv[1:])
if not (a / "meta.json").exists() or not (b / "meta.json").exists():
    sys.exit(f"missing step 4: {a.exists()} {b.exists()}")
print("files:", sorted(json.loads((a / "meta.json").read_text())["files"]))
wa, wb = load_file(a / "drafter" / "model.safetensors"), load_file(b / "drafter" / "model.safetensors")
print("max |uninterrupted - resumed| over the drafter:", max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa))
EOF
done
