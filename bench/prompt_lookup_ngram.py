import time, torch
from draftsmith.models import load_target
from draftsmith.models.prompt_lookup import PromptLookupProposer
from draftsmith.eval.harness import encode_turn
from draftsmith.eval.benchmarks import load_bench
from draftsmith.eval.decoder import speculative_generate, autoregressive_generate
t = load_target("smollm2-135m-instruct")
items = load_bench("mt_bench", 8)
ps=[encode_turn(t, it.turns, []) for it in items]
autoregressive_generate(t, ps[0], max_new_tokens=8)
variants=[("ar",None),("min1",PromptLookupProposer(3,1)),("min2",PromptLookupProposer(3,2))]
tot={n:[0,0,0] for n,_ in variants}
for p in ps:
  for name, prop in variants:
    s=time.perf_counter()
    r = autoregressive_generate(t,p,max_new_tokens=96,eos_token_ids=(2,)) if prop is None else speculative_generate(t,prop,p,k=4,max_new_tokens=96,eos_token_ids=(2,))
    tot[name][0]+=time.perf_counter()-s; tot[name][1]+=len(r.tokens); tot[name][2]+=r.steps
for name in tot:
    T,N,st=tot[name]; print(name, "tok/s %.2f"%(N/T), "tau %.3f"%((N-len(ps))/max(st,1)), flush=True)
