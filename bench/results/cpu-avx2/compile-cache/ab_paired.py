"""Run at c464b8c (before packed layers were the code's; `onednn` then froze the weights). Paired A/B, SmolLM2 fp32, one process: frozen oneDNN graph (today) vs packed buffers through a custom op lowered
to the same oneDNN call (LOWER=1). Per rep, per width, both paths one forward each, order alternating."""
import sys, time, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import torch
torch.set_num_threads(2)
torch._dynamo.config.specialize_float = True
from smol_ab_lib import probe_target

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
sizes = (1, 2, 4, 8)
ctx = 128
fw = {}
for mode in ("frozen", "packed"):
    t = probe_target(mode, ctx + 8 + 64)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, t.vocab_size, (ctx + 8,), generator=g).tolist()
    cache = t.new_cache()
    t.forward(ids[:ctx], cache, (), last_only=True)
    def forward(n, t=t, cache=cache, ids=ids):
        out = t.forward(ids[ctx:ctx + n], cache, ())
        t.rollback(cache, ctx)
        return out
    t0 = time.perf_counter()
    for n in sizes: forward(n)
    print(f"{mode}: compile {time.perf_counter() - t0:.0f} s", flush=True)
    fw[mode] = forward
ms = {m: {n: [] for n in sizes} for m in fw}
for r in range(reps):
    for n in sizes:
        for mode in (list(fw) if r % 2 == 0 else list(fw)[::-1]):
            t0 = time.perf_counter(); fw[mode](n); ms[mode][n].append(1e3 * (time.perf_counter() - t0))
print("| path | " + " | ".join(f"n={n}" for n in sizes) + " |")
for mode in ms:
    print(f"| {mode} (median of {reps}) | " + " | ".join(f"{statistics.median(ms[mode][n]):.1f}" for n in sizes) + " |")
print("| packed / frozen, median of paired ratios | " + " | ".join(
    f"{statistics.median([b / a for a, b in zip(ms['frozen'][n], ms['packed'][n])]):.3f}" for n in sizes) + " |")
