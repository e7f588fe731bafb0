"""Throwaway probe (not part of draftsmith): the compiled SmolLM2 target (oneDNN) with and without inductor's C++ wrapper,
both compiled in one process, then two interleaved rounds of the cost curve. Run from the repository root."""
import time, torch, sys
import torch._inductor.config as ic
from draftsmith.models.target import load_target
from draftsmith.eval.draft_length import measure_cost_curve
sizes=(1,2,4,8)
ts=[]
for wrap in (False, True):
    torch._dynamo.reset()
    ic.cpp_wrapper = wrap
    t = load_target("smollm2-135m-instruct", "fp32", "cpu")
    t.compile(128 + 8 + 64, linear_kernel="onednn")
    t0=time.perf_counter(); measure_cost_curve(t, sizes=sizes, context=128, reps=1); c=time.perf_counter()-t0
    print("cpp_wrapper", wrap, "compile %.0f s" % c, t.compiled.describe(), flush=True)
    ts.append(t)
for r in range(2):
    for wrap, t in zip((False, True), ts):
        ic.cpp_wrapper = wrap
        cur = measure_cost_curve(t, sizes=sizes, context=128, reps=7)
        print("round", r, "cpp_wrapper", wrap, " ".join("%d: %.1f" % (n, s*1e3) for n, s in zip(sizes, cur.seconds)), flush=True)
