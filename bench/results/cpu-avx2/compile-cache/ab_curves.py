"""Run at c464b8c (before packed layers were the code's; `onednn` then froze the weights). A/B in one process, SmolLM2 fp32: today's frozen oneDNN graph vs the target's linear layers packed as buffers
(custom op, no freezing); both with dynamo's specialize_float. Cost curves (eval/draft_length.measure_cost_curve)
alternating A, B over `rounds`; plus the eager per-call cost of the custom op vs the aten op."""
import sys, time, statistics
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import torch
torch.set_num_threads(2)
torch._dynamo.config.specialize_float = True
from smol_ab_lib import probe_target, packed_linear
from draftsmith.eval.draft_length import measure_cost_curve

sizes = (1, 2, 3, 4, 6, 8)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 4
targets = {}
for mode in ("frozen", "packed"):
    t = probe_target(mode, 128 + 8 + 64)
    t0 = time.perf_counter()
    measure_cost_curve(t, sizes=sizes, context=128, reps=1)
    print(f"{mode}: compile {time.perf_counter() - t0:.0f} s", flush=True)
    targets[mode] = t
ms = {m: {n: [] for n in sizes} for m in targets}
for r in range(rounds):
    for mode, t in targets.items():
        curve = measure_cost_curve(t, sizes=sizes, context=128, reps=3)
        for n, s in zip(sizes, curve.seconds):
            ms[mode][n].append(s * 1e3)
        print(f"round {r} {mode}: " + " ".join(f"{s*1e3:.1f}" for s in curve.seconds), flush=True)
print("| path | " + " | ".join(f"n={n}" for n in sizes) + " |")
for mode in ms:
    print(f"| {mode} (median of {rounds} rounds) | " + " | ".join(f"{statistics.median(ms[mode][n]):.1f}" for n in sizes) + " |")
# eager per-call overhead: custom op vs aten op, a 576x576 layer two rows wide
w = torch.randn(576, 576); p = torch.ops.mkldnn._reorder_linear_weight(w, None); x = torch.randn(2, 576)
for name, f in [("aten", lambda: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")),
                ("custom op", lambda: packed_linear(x, p, None))]:
    with torch.inference_mode():
        for _ in range(200): f()
        t0 = time.perf_counter()
        for _ in range(5000): f()
    print(f"eager {name}: {1e6*(time.perf_counter()-t0)/5000:.1f} us/call")
