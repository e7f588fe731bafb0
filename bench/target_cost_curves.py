"""The target's cost curves: ms of one forward over n new tokens after `--context` cached ones, per dtype and path.

    python -m draftsmith.bench.target_cost_curves --target smollm2-135m-instruct --dtypes fp32,bf16 \
        --paths eager,compiled-mm,compiled-onednn --rows 1,4,16

Paths: `eager` (transformers' forward on a dynamic cache: what `draftsmith eval` runs by default), `compiled`
(`--compile`: a static cache and the inductor graph, models/compiled_target.py; batched rows through
models/static_rows.py) with its linear layers on the kernel measured fastest on this CPU, or `compiled-mm` /
`compiled-onednn` / `compiled-rows` with that kernel (models/cpu_linear.py; the choice `compiled` makes, and what it measured, is
printed); a `-sdpa` suffix (`compiled-onednn-sdpa`) runs transformers' sdpa attention instead of the row-invariant
one (models/row_attention.py), to time what that costs. Rows > 1 time one batched forward over that many sequences
of n tokens each (eval/batched.py) and print the whole forward's ms. The curve is the one `--k auto` measures
(eval/draft_length.py, the median of --reps interleaved rounds); the compile time of each dtype is printed too. Run
it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from draftsmith.eval.draft_length import measure_cost_curve
from draftsmith.models.target import load_target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--paths", default="eager,compiled")   # compiled[-mm|-onednn|-rows][-sdpa]
    p.add_argument("--rows", default="1")
    p.add_argument("--sizes", default="1,2,3,4,6,8,12,16")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    sizes = tuple(int(x) for x in args.sizes.split(","))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, context {args.context}")
    print("| dtype | path | rows | " + " | ".join(f"n={n}" for n in sizes) + " | n=max / n=1 |")
    print("|---|---|---|" + "---|" * (len(sizes) + 1))
    for dtype in args.dtypes.split(","):
        target = load_target(args.target, dtype, args.device)
        for path in args.paths.split(","):
            compiled = path.startswith("compiled")
            if compiled:
                torch._dynamo.reset()                       # each path its own graphs
                kernel, sdpa = path.partition("-")[2].removesuffix("sdpa").strip("-"), path.endswith("-sdpa")
                target.compile(args.context + max(sizes) + 64, linear_kernel=kernel or "auto", row_invariant=not sdpa)
                started = time.perf_counter()
                measure_cost_curve(target, sizes=sizes, context=args.context, reps=1)   # builds the graphs
                print(f"({path} {dtype}: {target.compiled.describe()}; compiling "
                      f"{time.perf_counter() - started:.0f} s)", flush=True)
            else:
                target.compiled = None
            for rows in [int(r) for r in args.rows.split(",")]:
                curve = measure_cost_curve(target, sizes=sizes, context=args.context, reps=args.reps, rows=rows)
                ms = [s * rows * 1e3 for s in curve.seconds]
                print(f"| {dtype} | {path} | {rows} | " + " | ".join(f"{m:.1f}" for m in ms)
                      + f" | {ms[-1] / ms[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
