"""One-off A/B (kept with its results): the tree builder before this change (each node's children ranked by its own
softmax + topk, `_top`) against `rank` (one softmax + topk per drafting round over every row), in ONE process,
rotating order, on the same prompts at a fixed k (the same drafts: outputs compared), batch 1, 4 and 16.

    git show a10e476:protocol/drafting.py > /tmp/old_drafting.py
    python bench/results/cpu-tree-ranking/ab_ranking.py bf16 /tmp/old_drafting.py

SmolLM2 compiled as `draftsmith eval --compile` compiles it, the eagle3-cpu-quick head alone, tree dynamic:8,2,3,
k=4, greedy, MT-bench first turns 1-16 x 32 new tokens. Prints the drafting milliseconds per step and the decode
tokens/s (prefills excluded) of each variant.
"""
import importlib.util
import sys
import time

import torch

import draftsmith.models.eagle as eagle
import draftsmith.protocol.drafting as new
from draftsmith.eval.batched import BatchTiming, batched_generate
from draftsmith.eval.benchmarks import load_bench
from draftsmith.eval.harness import compile_target, encode_turn, eos_ids
from draftsmith.models import load_drafter, load_target
from draftsmith.protocol.drafting import TreeShape

spec = importlib.util.spec_from_file_location("draftsmith.protocol.old_drafting", sys.argv[2])
old = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = old
spec.loader.exec_module(old)
dtype = sys.argv[1]
target = load_target("smollm2-135m-instruct", dtype, "cpu")
proposer = load_drafter("runs/eagle3-cpu-quick/speculators", target)
tree = TreeShape.parse("dynamic:8,2,3")
eos = eos_ids(target)
prompts = [encode_turn(target, item.turns[:1], []) for item in load_bench("mt_bench", 16, 1)]
compile_target(target, proposer, max(map(len, prompts)) + 64, tree.depth)
print(f"{dtype}, {torch.get_num_threads()} threads")


def run(mod, size, new_tokens=32, batch=prompts):
    eagle.grow_rows, eagle.grow_draft = mod.grow_rows, mod.grow_draft
    timing = BatchTiming()
    started = time.perf_counter()
    out = batched_generate(target, proposer, batch, batch_size=size, k=4, tree=tree, max_new_tokens=new_tokens,
                           eos_token_ids=eos, timing=timing)
    return out, timing, time.perf_counter() - started - timing.prefill_s


for size in (1, 4, 16):
    for mod in (old, new):          # warm-up
        run(mod, size, 8, prompts[:size])
    res = {"old": [], "new": []}
    for r in range(4):
        name = ("old", "new")[(r + r // 2) % 2]
        res[name].append(run(old if name == "old" else new, size))
    same = [o.tokens for o in res["old"][0][0]] == [o.tokens for o in res["new"][0][0]]
    line = []
    for name, runs in res.items():
        draft = sum(t.draft_s for _, t, _ in runs) / sum(t.steps for _, t, _ in runs) * 1e3
        tokens = sum(len(o.tokens) for o in runs[0][0])
        decode = tokens * len(runs) / sum(s for *_, s in runs)
        line.append(f"{name}: draft {draft:.2f} ms/step, decode {decode:.1f} tok/s")
    print(f"{dtype} batch {size}: " + "; ".join(line) + f"; steps {res['old'][0][1].steps}; outputs equal: {same}",
          flush=True)
