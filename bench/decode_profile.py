"""Where a speculative step's time goes, and which draft length / tree pays on this device.

For each drafter and each decoding setting (`--k` values: integers for fixed chains, `auto` for the
cost-aware rule; `--tree` specs), on the same prompts, interleaved per prompt with plain decoding
(one AR run per prompt, so every setting is compared in one run): τ, tokens/s, speedup over AR, the
per-step time split (target verify forward, drafting, observe, decoder work outside model calls, and
the prompt's prefill spread over the steps),
drafter forwards per step, α per draft position, and the target's cost curve; for a drafter with a
confidence head (dspark), its predicted acceptance per position beside the measured one. Greedy; lossless is checked on every run.
What bounds a setting: `free drafting` is the speedup its steps would reach if drafting and observing cost nothing
(a faster drafter cannot beat it), `τ for GOAL x` the tokens a step must emit at its measured step cost for a
speedup of `--goal` (default 1.4).

    python bench/decode_profile.py --drafter prompt-lookup --drafter runs/eagle3-ttt-quick/speculators \\
        --k 1,2,3,4,6,8,auto --tree "none;dynamic:4,4,16" --num-prompts 8 --max-new-tokens 96

`--dtype bf16` and `--compile` (the target through eval's static cache and compiled forward) profile the fast
paths the same way. `--plain-dtype bf16` (beside `--dtype fp32`, say) also times plain decoding of the same prompts
with the target in that precision, per prompt beside the rest, and gives each setting's speedup, and its free-drafting
bound, over the faster of the two plain decodings (what `draftsmith eval --plain-dtypes` calls the fastest plain).
Run it on a quiet machine (DESIGN.md: two torch processes on 2 cores slow each other 5-10x).
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

from draftsmith.eval.benchmarks import load_bench
from draftsmith.eval.decoder import autoregressive_generate, speculative_generate
from draftsmith.eval.draft_length import DraftLengthRule, measure_cost_curve
from draftsmith.eval.harness import encode_turn, eos_ids
from draftsmith.eval.metrics import reliability_by_position
from draftsmith.metric_modules.acceptance.acceptance_figures import acceptance_figures
from draftsmith.errors import DraftsmithError
from draftsmith.models import load_drafter, load_target
from draftsmith.models.target import resolve_dtype
from draftsmith.protocol.proposer import held_modules
from draftsmith.protocol.drafting import TreeShape


def count_drafter_forwards(proposer, target) -> list[int]:
    """Hook the drafter's own modules (not the target's parts it borrows), a composite's members' too; returns
    a live counter."""
    target_modules = {id(m) for m in target.model.modules()}
    counter = [0]
    for module in held_modules(proposer):
        if id(module) not in target_modules:
            module.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def settings(ks: list[str], trees: list[str]) -> list[tuple[str, int | str, TreeShape | None]]:
    out = []
    for tree in trees:
        shape = TreeShape.parse(tree)
        for k in ks:
            if shape is not None and k != "auto" and int(k) != shape.depth:
                continue   # a tree's depth is its spec's; fixed k only names chains
            out.append((f"k={k} tree={tree}", k if k == "auto" else int(k), shape))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--drafter", action="append", required=True)
    ap.add_argument("--bench", default="mt_bench")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--k", default="1,2,4,auto", help="comma list of integers and/or auto")
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--tree", default="none", help="comma-separated list is ambiguous with dynamic:a,b,c: use ';'")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", action="store_true", help="the target through --compile's static cache and graph")
    ap.add_argument("--linear-kernel", default="auto", choices=("auto", "mm", "onednn", "rows"),
                    help="with --compile: the target's linear layers' kernel (auto: the faster here, models/cpu_linear.py)")
    ap.add_argument("--goal", type=float, default=1.4, help="the speedup whose required tau the table gives")
    ap.add_argument("--plain-dtype", default=None,
                    help="also time plain decoding with the target in this precision (e.g. bf16 beside --dtype fp32)")
    args = ap.parse_args()
    for flag, dtype in (("--dtype", args.dtype), ("--plain-dtype", args.plain_dtype)):
        try:                           # before minutes of loading and compiling
            resolve_dtype(dtype, "cpu")
        except DraftsmithError as e:
            ap.error(f"{flag}: {e}")
    ks = args.k.split(",")
    trees = args.tree.split(";")

    target = load_target(args.target, args.dtype)
    eos = eos_ids(target)
    items = load_bench(args.bench, args.num_prompts, 1)
    prompts = [encode_turn(target, item.turns[:1], []) for item in items]
    if args.compile:
        target.compile(max(256, -(-(max(map(len, prompts)) + args.max_new_tokens + args.k_max + 2) // 64) * 64),
                       linear_kernel=args.linear_kernel)
        print("target:", target.compiled.describe())
    curve = measure_cost_curve(target)
    print("target forward cost (ms) by new tokens:",
          ", ".join(f"{n}: {s * 1e3:.1f}" for n, s in zip(curve.sizes, curve.seconds)), flush=True)
    limits = dict(max_new_tokens=args.max_new_tokens, eos_token_ids=eos)
    autoregressive_generate(target, prompts[0], max_new_tokens=8)          # warm-up
    alt = None
    if args.plain_dtype:               # the same target in another precision, plain decoding only
        alt = load_target(args.target, args.plain_dtype)
        if args.compile:
            alt.compile(target.static_length)
        print(f"plain decoding also in {alt.dtype}: {alt.describe_forward()}", flush=True)
        autoregressive_generate(alt, prompts[0], max_new_tokens=8)         # warm-up: its graphs
    alt_s, alt_tokens = 0.0, 0
    ar_s, ar_tokens, ar_out = 0.0, 0, []
    runs = []
    for spec in args.drafter:
        proposer = load_drafter(spec, target)
        packed = target.pack_drafter(proposer)
        if packed:
            print(f"{spec}: {packed} linear layers on {target.compiled.kernel.name}, as the target's")
        forwards = count_drafter_forwards(proposer, target)
        for name, k, tree in settings(ks, trees):
            rule = DraftLengthRule(curve) if k == "auto" else None
            depth = tree.depth if tree else (args.k_max if k == "auto" else k)
            runs.append(dict(drafter=spec, name=name, proposer=proposer, forwards=forwards, rule=rule,
                             depth=depth, tree=tree, s=0.0, tokens=0, steps=0, emitted=0, draft=0.0,
                             verify=0.0, observe=0.0, prefill=0.0, calls=0, lossless=0, nodes=0,
                             accepted=[], proposed=[], depths=[], predicted=[]))
    for r in runs:   # warm-up: the drafters' first forwards, and with --compile the graphs a prefill with taps needs
        speculative_generate(target, r["proposer"], prompts[0], k=2, max_new_tokens=8, tree=r["tree"],
                             eos_token_ids=eos)
        r["forwards"][0] = 0
    for prompt in tqdm(prompts, desc="prompts", unit="prompt"):   # every setting on this prompt, then the next
        start = time.perf_counter()
        ar = autoregressive_generate(target, prompt, **limits)
        ar_s += time.perf_counter() - start
        ar_tokens += len(ar.tokens)
        if alt is not None:
            start = time.perf_counter()
            alt_tokens += len(autoregressive_generate(alt, prompt, **limits).tokens)
            alt_s += time.perf_counter() - start
        for r in runs:
            before = r["forwards"][0]
            start = time.perf_counter()
            sd = speculative_generate(target, r["proposer"], prompt, k=r["depth"], tree=r["tree"], rule=r["rule"],
                                      **limits)
            r["s"] += time.perf_counter() - start
            r["calls"] += r["forwards"][0] - before
            r["tokens"] += len(sd.tokens)
            r["steps"] += sd.steps
            r["emitted"] += sum(sd.emitted)
            r["nodes"] += sum(sd.proposed)
            r["draft"] += sd.draft_s
            r["verify"] += sd.verify_s
            r["observe"] += sd.observe_s
            r["prefill"] += sd.prefill_s
            r["lossless"] += sd.tokens == ar.tokens
            r["accepted"].append(sd.accepted)
            r["proposed"].append(sd.proposed)
            r["depths"].append(sd.depth)
            r["predicted"] += sd.predicted
    ar_tps = ar_tokens / ar_s
    print(f"\n{len(prompts)} prompts of {args.bench}, {args.max_new_tokens} new tokens, greedy, "
          f"{target.dtype}, {target.device}, torch threads {torch.get_num_threads()}; AR {ar_tps:.1f} tok/s\n")
    # what bounds the speedup: `free drafting` = the speedup were drafting and observing free (the same steps, the
    # verify, decoder work and prefill kept); `τ for GOAL` = the tokens a step must emit at this step cost
    print("| drafter | setting | τ | α1..α4 | nodes/step | drafter fwd/step | SD tok/s | speedup | ms/step: verify "
          f"| draft | observe | other | prefill | free drafting | τ for {args.goal:g}x | lossless |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        steps = max(r["steps"], 1)
        per = {key: r[key] / steps * 1e3 for key in ("verify", "draft", "observe", "prefill")}
        other = r["s"] / steps * 1e3 - sum(per.values())
        tps = r["tokens"] / r["s"]
        alphas = acceptance_figures(r["accepted"], r["proposed"], r["depths"], k=4)["acceptance_by_position"]
        alpha = "/".join("-" if a is None else f"{a:.2f}" for a in alphas[:4])
        r["free_tps"] = r["tokens"] / (r["s"] - r["draft"] - r["observe"])    # tok/s were drafting free
        free = r["free_tps"] / ar_tps
        # (τ' × steps + the prefills' first tokens) / s = goal × AR tok/s, at the same steps and seconds
        needed = (args.goal * ar_tps * r["s"] - (r["tokens"] - r["emitted"])) / steps
        print(f"| {r['drafter']} | {r['name']} | {r['emitted'] / steps:.3f} | {alpha} | {r['nodes'] / steps:.2f} "
              f"| {r['calls'] / steps:.2f} | {tps:.1f} | {tps / ar_tps:.2f}x | {per['verify']:.1f} | {per['draft']:.1f} "
              f"| {per['observe']:.1f} | {other:.1f} | {per['prefill']:.1f} | {free:.2f}x | {needed:.2f} "
              f"| {r['lossless']}/{len(prompts)} |", flush=True)
    if alt is not None:               # against the faster plain decoding of the two precisions
        alt_tps = alt_tokens / alt_s
        fastest = max(ar_tps, alt_tps)
        alt_name, own_name = (str(t.dtype).replace("torch.", "") for t in (alt, target))
        name = alt_name if alt_tps > ar_tps else own_name
        print(f"\nplain decoding in {alt_name}: {alt_tps:.1f} tok/s; the fastest plain: "
              f"{name}, {fastest:.1f} tok/s\n")
        print("| drafter | setting | SD tok/s | over the fastest plain | free drafting over it |")
        print("|---|---|---|---|---|")
        for r in runs:
            tps = r["tokens"] / r["s"]
            print(f"| {r['drafter']} | {r['name']} | {tps:.1f} | {tps / fastest:.2f}x "
                  f"| {r['free_tps'] / fastest:.2f}x |", flush=True)
    for r in runs:     # a drafter that predicts its own acceptance (a confidence head): how well, per position
        if r["predicted"]:
            cells = [f"pos {row['position']}: predicted {row['predicted']:.3f} measured {row['measured']:.3f} "
                     f"[{row['measured_ci95'][0]:.3f}, {row['measured_ci95'][1]:.3f}] (n={row['count']}) "
                     f"{'calibrated' if row['calibrated'] else 'MISCALIBRATED'}"
                     for row in reliability_by_position(r["predicted"])]
            print(f"confidence head, {r['drafter']} {r['name']}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
