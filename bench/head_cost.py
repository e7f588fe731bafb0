"""What one call of each part of an EAGLE head costs while decoding, and what bounds it.

A speculative step runs the head once to observe the accepted rows (fuse + decoder layer) and once per drafting
round (decoder layer + draft LM head, the logits mapped to the target's vocabulary). Each part is timed alone,
hot (called again and again, its weights in the CPU's caches) and cold (after a sweep over as many bytes as the
target's weights, which is what the target's verify forward does between two head calls), in the head's dtype
and in bf16, on the head's own `nn.Linear` layers or (`--kernel onednn`) packed for oneDNN, as `draftsmith eval
--compile` packs a drafter when the target's layers run oneDNN (models/cpu_linear.py). `floor` is the part's weight
bytes at the bandwidth the sweep itself reached: a cold call near its floor is bound by reading its weights; far above
it, by the per-op work of a small forward.

    python bench/head_cost.py --drafter runs/eagle3-cpu-quick/speculators --rows 1,2,3
    python bench/head_cost.py --drafter runs/eagle3-cpu-quick/speculators --rows 1,2,4 --dtypes fp32 --kernel onednn

Run it on a quiet machine (two torch processes on 2 cores slow each other several times over).
"""

from __future__ import annotations

import argparse
import time

import torch

from draftsmith.models import cpu_linear, load_drafter, load_target
from draftsmith.models.row_batch import Feed

CONTEXT = 100
"""Rows already in the head's cache when a part is timed (a prompt's worth)."""


def weight_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def proposer_in(spec: str, target, dtype: torch.dtype, kernel: str = "mm"):
    p = load_drafter(spec, target)
    if not hasattr(p, "head"):
        raise SystemExit(f"{spec} is not an EAGLE-style head (no .head): this bench times EAGLE / EAGLE-3 heads")
    p.head.to(dtype)
    p.dtype = dtype
    if kernel == "onednn":
        cpu_linear.pack_drafter(p, {id(w) for w in target.model.parameters()})
    return p


def parts(p, rows: int, hidden: int, taps: int):
    """name -> (call, weight bytes): every call starts from a head cache of CONTEXT rows."""
    head = p.head
    layer = head.layers[0]
    fc = [head.fc] if hasattr(head, "fc") else []
    feats = [torch.randn(rows, hidden) for _ in range(taps)]
    one = torch.randn(1, hidden, dtype=p.dtype)
    tokens = list(range(5, 5 + rows))
    lm = [head.lm_head] if hasattr(head, "lm_head") else [p.lm_head]
    return {
        f"fuse (fc over the tapped layers), {rows} row(s)": (lambda: p._fuse(feats), weight_bytes(*fc)),
        f"decoder layer, {rows} row(s)": (lambda: p._feed(Feed(torch.randn(rows, hidden), tokens, CONTEXT)),
                                          weight_bytes(layer)),
        f"observe (fuse + layer), {rows} row(s)": (lambda: p._feed(Feed(p._fuse(feats), tokens, CONTEXT)),
                                                   weight_bytes(layer, *fc)),
        "draft LM head": (lambda: (head.logits(one) if hasattr(head, "logits") else p.lm_head(one)), weight_bytes(*lm)),
        "draft logits in the target vocabulary": (lambda: p._logits(one), weight_bytes(*lm)),
    }


def reset(p, hidden: int, taps: int) -> None:
    p.reset()
    p._feed(Feed(p._fuse([torch.randn(CONTEXT, hidden) for _ in range(taps)]), list(range(1, CONTEXT + 1)), 0))


@torch.inference_mode()
def time_call(p, call, cold: bool, sweep: torch.Tensor, reps: int, hidden: int, taps: int) -> float:
    times = []
    for _ in range(reps):
        reset(p, hidden, taps)
        if cold:
            sweep.sum()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--drafter", required=True, help="an EAGLE / EAGLE-3 head folder")
    ap.add_argument("--rows", default="1,2,3", help="rows a decoder-layer call reads (observe: the accepted ones)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--reps", type=int, default=31)
    ap.add_argument("--kernel", default="mm", choices=("mm", "onednn"),
                    help="the head's linear layers as loaded (mm) or packed for oneDNN, as --compile decodes with them")
    args = ap.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    names = args.dtypes.split(",")
    rows = [r for r in args.rows.split(",") if r]
    if args.kernel == "onednn" and not cpu_linear.onednn_available():
        raise SystemExit("head_cost: --kernel onednn needs a CPU torch built with oneDNN; use --kernel mm")
    if set(names) - set(dtypes) or not all(r.isdigit() and int(r) > 0 for r in rows):
        raise SystemExit(f"head_cost: --dtypes takes fp32 and/or bf16 (seen {args.dtypes!r}) and --rows positive "
                         f"integers (seen {args.rows!r}); e.g. --dtypes fp32,bf16 --rows 1,2,3")
    target = load_target(args.target, "fp32", "cpu")
    hidden = target.model.config.hidden_size
    sweep = torch.ones(weight_bytes(target.model) // 4)
    with torch.inference_mode():
        sweep.sum()
        start = time.perf_counter()
        for _ in range(5):
            sweep.sum()
        bandwidth = 5 * sweep.numel() * 4 / (time.perf_counter() - start)
    print(f"target weights {weight_bytes(target.model) / 2**20:.0f} MiB; a sweep over them reads {bandwidth / 1e9:.1f} "
          f"GB/s; torch threads {torch.get_num_threads()}, torch {torch.__version__}; the head's linear layers on "
          f"{args.kernel}\n")
    print("| dtype | part | weights MiB | hot ms | cold ms | floor ms (weights at the sweep's GB/s) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        p = proposer_in(args.drafter, target, dtypes[name], args.kernel)
        taps = len(p.hidden_layers)
        seen = set()
        for rows in map(int, rows):
            for part, (call, nbytes) in parts(p, rows, hidden, taps).items():
                if part in seen:
                    continue
                if "row(s)" not in part:   # the draft LM head reads one row whatever --rows says
                    seen.add(part)
                hot = time_call(p, call, False, sweep, args.reps, hidden, taps)
                cold = time_call(p, call, True, sweep, args.reps, hidden, taps)
                print(f"| {name} | {part} | {nbytes / 2**20:.1f} | {hot * 1e3:.2f} | {cold * 1e3:.2f} "
                      f"| {nbytes / bandwidth * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
