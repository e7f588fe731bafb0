#!/usr/bin/env bash
# Regeneration throughput of the two engines on the same conversations (issue 12): the built-in
# engine (batched transformers generate) and `transformers serve` behind --endpoint, SmolLM2-135M-
# Instruct, greedy, fp32 on the CPU. Prints one line per engine: answers, new tokens, seconds, tok/s
# (from each output folder's manifest), and whether the two folders hold the same answers.
#
#   bash bench/regen_throughput.sh [N_CONVERSATIONS=48] [OUT=/tmp/regen-throughput]
#
# Run it on a quiet machine: both engines use every core (set OMP_NUM_THREADS to pin them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
N="${1:-48}"
OUT="${2:-/tmp/regen-throughput}"
MNT=256
mkdir -p "$OUT"
FOLDER="$(python -c "
from draftsmith import assets
from draftsmith.models.target import gguf_to_folder
print(gguf_to_folder(assets.target_gguf_path('smollm2-135m-instruct')))")"
COMMON=(--target "$FOLDER" --source sharegpt --max-conversations "$N" --max-new-tokens "$MNT" --max-prompt-tokens 256)

draftsmith data regenerate "${COMMON[@]}" --out "$OUT/builtin" --batch-size 8 --overwrite

PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
transformers serve "$FOLDER" --host 127.0.0.1 --port "$PORT" --device cpu --dtype float32 > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 240); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -20 "$OUT/serve.log"; exit 1; }
  sleep 0.5
done
draftsmith data regenerate "${COMMON[@]}" --out "$OUT/endpoint" --endpoint "http://127.0.0.1:$PORT/v1" \
  --model "$FOLDER" --concurrency 8 --overwrite

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {}
for engine in ("builtin", "endpoint"):
    m = json.loads((out / engine / "manifest.json").read_text())
    c = m["counts"]
    rows[engine] = [json.loads(line) for p in sorted((out / engine / "shards").glob("*.jsonl"))
                    for line in p.read_text().splitlines()]
    print(f"{engine:9s} answers {c['answers']:5d}  new tokens {c['new_tokens']:7d}  "
          f"seconds {c['seconds']:8.1f}  tok/s {c['new_tokens_per_s']:6.1f}")
same = sum(a == b for a, b in zip(rows["builtin"], rows["endpoint"]))
print(f"identical conversations: {same} of {len(rows['builtin'])}")
EOF
