"""Throwaway probe (not part of draftsmith): torch.profiler over ten compiled SmolLM2 forwards of N tokens with inductor's
kernel profile on. `python prof2.py onednn 2` from the repository root."""
import time, torch, sys
import torch._inductor.config as ic
ic.cpp.enable_kernel_profile = True
from draftsmith.models.target import load_target
from draftsmith.eval.draft_length import measure_cost_curve
t = load_target("smollm2-135m-instruct", "fp32", "cpu")
t.compile(128 + 8 + 64, linear_kernel=sys.argv[1])
n = int(sys.argv[2])
t0=time.perf_counter(); measure_cost_curve(t, sizes=(1, 4), context=128, reps=1); print("compile", time.perf_counter()-t0, flush=True)
ids = list(range(100, 240))
cache = t.new_cache(); t.forward(ids[:128], cache, (), last_only=True)
def f():
    t.forward(ids[128:128+n], cache, ()); t.rollback(cache, 128)
for _ in range(3): f()
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(10): f()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90))
