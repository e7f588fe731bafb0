"""The two kernels `--compile` chooses between for the target's linear layers, per weight shape and width.

    python -m draftsmith.bench.linear_kernels --target smollm2-135m-instruct --dtype fp32 --widths 1,2,3,4,8,16

Prints, for every distinct nn.Linear weight shape of the target (and how many layers have it), the ms of one
`mm` call on the weight as it is (MKL's sgemm in fp32) and of one call to oneDNN's prepacked linear (one row run
two rows wide, as the compiled target runs it), and the whole forward's linear layers per width; then the choice
`draftsmith eval --compile` makes on this machine (models/cpu_linear.py). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse

import torch

from draftsmith.models import cpu_linear
from draftsmith.models.target import load_target


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--widths", default="1,2,3,4,8,16")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise SystemExit(f"--widths takes positive integers separated by commas, e.g. 1,2,4,8; got {args.widths!r}")
    if not cpu_linear.onednn_available():
        raise SystemExit("this torch has no oneDNN linear: `--compile` runs mm")
    model = load_target(args.target, args.dtype, "cpu").model
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.target} {args.dtype}")
    rows = cpu_linear.measure_shapes(model, args.reps, widths)
    print("| weight [out, in] | layers | " + " | ".join(f"n={w} mm / onednn" for w in widths) + " |")
    print("|---|---|" + "---|" * len(widths))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        cells = [r for r in rows if r["shape"] == shape]
        print(f"| {list(shape)} | {cells[0]['count']} | "
              + " | ".join(f"{r['mm']:.3f} / {r['onednn']:.3f}" for r in cells) + " |")
    per_width = [(sum(r["count"] * r["mm"] for r in rows if r["width"] == w),
                  sum(r["count"] * r["onednn"] for r in rows if r["width"] == w)) for w in widths]
    print("| one forward's linear layers | | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in per_width) + " |")
    print("choice:", cpu_linear.choose(model, reps=args.reps).describe())


if __name__ == "__main__":
    main()
