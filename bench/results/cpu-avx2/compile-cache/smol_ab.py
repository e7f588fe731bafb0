"""Run at c464b8c (before packed layers were the code's). SmolLM2 fp32: frozen oneDNN (then the code's) vs packed-buffer oneDNN custom op (probe), compile times and ms/token in one
process, interleaved. Usage (SPEC_FLOAT=1 sets dynamo's specialize_float): python smol_ab.py [modes=onednn,packed] [tokens=32] [rounds=3]"""
import sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import torch
from smol_ab_lib import probe_target
from draftsmith.eval.decoder import autoregressive_generate
from torch._dynamo.utils import counters

modes = (sys.argv[1] if len(sys.argv) > 1 else "onednn,packed").split(",")
n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
torch.set_num_threads(2)
import os
if os.environ.get("SPEC_FLOAT"): torch._dynamo.config.specialize_float = True

targets = {}
for mode in modes:
    t = probe_target(mode, 512)
    prompt = t.tokenizer("Explain speculative decoding in two sentences.")["input_ids"]
    counters.clear()
    t0 = time.perf_counter()
    autoregressive_generate(t, prompt, max_new_tokens=2)
    print(f"{mode}: first generate (compile) {time.perf_counter()-t0:.1f} s",
          {k: {a: b for a, b in v.items() if "cache" in a} for k, v in counters.items() if k in ("inductor", "aot_autograd")}, flush=True)
    targets[mode] = (t, prompt)
outs = {}
for r in range(rounds):
    for mode, (t, prompt) in targets.items():
        t0 = time.perf_counter()
        out = autoregressive_generate(t, prompt, max_new_tokens=n)
        dt = time.perf_counter() - t0
        outs.setdefault(mode, out.tokens)
        assert outs[mode] == out.tokens
        print(f"round {r} {mode}: {1e3*dt/n:.1f} ms/token", flush=True)
print("same tokens:", len({tuple(v) for v in outs.values()}) == 1, outs[modes[0]][:16])
print(torch._dynamo.utils.compile_times(repr="str", aggregate=True))
