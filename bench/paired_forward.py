"""The compiled target's forward with each linear kernel, timed in pairs: one process, one target per kernel, each width
run on every kernel back to back, the order alternating by round. On a host whose pace moves ~20% within minutes
(bench/results/cpu-avx2) this is the comparison that resolves a few percent; bench/target_cost_curves.py times one
path after another.

    python -m draftsmith.bench.paired_forward --target smollm2-135m-instruct --dtype fp32 --kernels onednn,rows \
        --sizes 1,2,4,8 --reps 20

Prints per kernel the median ms of one forward of n new tokens after `--context` cached ones, and per kernel after
the first the median of its paired ratios to the first. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from draftsmith.models.target import load_target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--kernels", default="onednn,rows")
    p.add_argument("--sizes", default="1,2,4,8")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    kernels = args.kernels.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.target} {args.dtype}, "
          f"context {args.context}, {args.reps} rounds")
    forwards = {}
    for kernel in kernels:
        target = load_target(args.target, args.dtype)
        target.compile(args.context + max(sizes) + 64, linear_kernel=kernel)
        ids = torch.randint(0, target.vocab_size, (args.context + max(sizes),),
                            generator=torch.Generator().manual_seed(0)).tolist()
        cache = target.new_cache()
        target.forward(ids[:args.context], cache, last_only=True)

        def forward(n, target=target, cache=cache, ids=ids):
            target.forward(ids[args.context:args.context + n], cache)
            target.rollback(cache, args.context)

        started = time.perf_counter()
        for n in sizes:
            forward(n)
        print(f"{kernel}: {target.compiled.describe()}; first forwards {time.perf_counter() - started:.0f} s",
              flush=True)
        forwards[kernel] = forward
    ms = {k: {n: [] for n in sizes} for k in kernels}
    for r in range(args.reps):
        for n in sizes:
            for kernel in kernels if r % 2 == 0 else kernels[::-1]:
                started = time.perf_counter()
                forwards[kernel](n)
                ms[kernel][n].append(1e3 * (time.perf_counter() - started))
    print("| kernel | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for kernel in kernels:
        print(f"| {kernel}, ms (median) | " + " | ".join(f"{statistics.median(ms[kernel][n]):.1f}" for n in sizes)
              + " |")
    first = kernels[0]
    for kernel in kernels[1:]:
        print(f"| {kernel} / {first}, paired | " + " | ".join(
            f"{statistics.median([b / a for a, b in zip(ms[first][n], ms[kernel][n])]):.3f}" for n in sizes) + " |")


if __name__ == "__main__":
    main()
