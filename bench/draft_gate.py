"""Does `--k auto`'s DraftGate pay? Batched plain decoding, speculative decoding with the gate, and speculative
decoding drafting every step (the decoder before the gate), on the same prompts in ONE process, in rotating order.

    python bench/draft_gate.py --dtype fp32 --batch-size 4,16 --num-prompts 32 --max-new-tokens 64

Same target setting and drafter as the main job (prompt lookup + its head; the tree it had, `dynamic:8,2,3`),
compiled as `draftsmith eval --compile` compiles (eval/harness.py `compile_target`: the static cache, the compiled
forward, the drafter's linear layers on oneDNN), greedy. Prints per batch size and decoder:
tokens/s over the whole pass and over its decode steps alone (without the prefills, which each prompt runs alone
and which cost every decoder the same), the ratio to plain decoding, τ, the steps the gate ran without drafts and
the milliseconds a step spent drafting, observing and verifying (BatchTiming; a step without drafts drafts nothing);
every output is checked against the batched plain decoding's. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from draftsmith.eval.batched import BatchTiming, batched_generate
from draftsmith.eval.benchmarks import load_bench
from draftsmith.eval.decoder import NoDraft
from draftsmith.eval.draft_length import DraftLengthRule, measure_cost_curve
from draftsmith.eval.harness import compile_target, encode_turn, eos_ids
from draftsmith.models import load_drafter, load_target
from draftsmith.protocol.drafting import TreeShape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--drafter", default="prompt-lookup+runs/eagle3-cpu-quick/speculators")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch-size", default="4,16")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--tree", default="dynamic:8,2,3")
    ap.add_argument("--rounds", type=int, default=1, help="passes of each decoder per batch size")
    args = ap.parse_args()
    target = load_target(args.target, args.dtype, "cpu")
    proposer = load_drafter(args.drafter, target)
    tree = TreeShape.parse(args.tree)
    eos, layers = eos_ids(target), tuple(proposer.hidden_layers)
    prompts = [encode_turn(target, item.turns[:1], []) for item in load_bench("mt_bench", args.num_prompts, 1)]
    compile_target(target, proposer, max(map(len, prompts)) + args.max_new_tokens, tree.depth)   # as eval does
    print(f"{args.target} {target.dtype}, compiled; {args.drafter}, tree {args.tree}; {len(prompts)} MT-bench prompts "
          f"x {args.max_new_tokens} new tokens; {torch.get_num_threads()} threads")
    print("| batch | decoder | tok/s | decode tok/s | over plain | decode over plain | τ | steps without drafts "
          "| draft ms/step | observe ms/step | verify ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in (int(b) for b in args.batch_size.split(",")):
        curve = measure_cost_curve(target, hidden_layers=layers, rows=size)

        def run(name, batch=prompts, rows=size, new=args.max_new_tokens):
            rule = None if name == "plain" else DraftLengthRule(curve)
            timing = BatchTiming()
            started = time.perf_counter()
            out = batched_generate(target, NoDraft() if name == "plain" else proposer, batch, batch_size=rows,
                                   k=0 if name == "plain" else tree.depth, tree=None if name == "plain" else tree,
                                   rule=rule, max_new_tokens=new, eos_token_ids=eos, timing=timing,
                                   draft_gate=name == "gated")
            return out, time.perf_counter() - started, timing

        for rows in (size, 1):          # warm-up: this batch's shapes and a draining batch's last row
            for name in ("plain", "gated", "always"):
                run(name, prompts[:rows], rows, 8)
        figures: dict[str, list] = {"plain": [], "gated": [], "always": []}
        order = ["plain", "gated", "always"]
        for r in range(args.rounds * 3):
            name = order[(r + r // 3) % 3]          # every decoder first once per three passes
            if len(figures[name]) < args.rounds:
                figures[name].append(run(name))
        reference = [o.tokens for o in figures["plain"][0][0]]
        base = {}
        for name, passes in figures.items():
            tokens = sum(len(o.tokens) for o in passes[0][0])
            seconds = sum(s for _, s, _ in passes) / len(passes)
            decode = sum(s - t.prefill_s for _, s, t in passes) / len(passes)
            steps = sum(t.steps for _, _, t in passes)
            tau = sum(len(o.tokens) - 1 for o in passes[0][0]) / max(1, sum(o.steps for o in passes[0][0]))
            base.setdefault("tok", tokens / seconds)
            base.setdefault("dec", tokens / decode)
            same = sum(o.tokens == ref for o, ref in zip(passes[0][0], reference))
            undrafted = sum(t.undrafted_steps for _, _, t in passes)
            per_step = [sum(getattr(t, part) for _, _, t in passes) * 1e3 / max(1, steps)
                        for part in ("draft_s", "observe_s", "verify_s")]
            differ = ("" if same == len(reference)
                      else f" outputs equal to batched plain decoding's: {same}/{len(reference)}")
            print(f"| {size} | {name} | {tokens / seconds:.1f} | {tokens / decode:.1f} | "
                  f"{tokens / seconds / base['tok']:.3f} | {tokens / decode / base['dec']:.3f} | {tau:.3f} | "
                  f"{undrafted} / {steps} | {' | '.join(f'{ms:.1f}' for ms in per_step)} |{differ}")


if __name__ == "__main__":
    main()
