"""The kernels `--compile` chooses between for the target's linear layers, per weight shape and width.

    python -m draftsmith.bench.linear_kernels --target smollm2-135m-instruct --dtype fp32 --widths 1,2,3,4,8,16

Prints, for every distinct nn.Linear weight shape of the target (and how many layers have it), the ms of one call
of each kernel this CPU runs in that dtype (models/cpu_linear.py `kernels_here`): `mm` on the weight as it is
(MKL's sgemm in fp32), oneDNN's prepacked linear, draftsmith's row kernel (models/row_kernel.py) — the last two with
one row run two rows wide, as the compiled target runs them — and the whole forward's linear layers per width; then
the choice `draftsmith eval --compile` makes on this machine. Hot: each shape's weight is called again and again
(a forward streams every layer's weights from memory once; bench/paired_forward.py times whole forwards). Run it on
a quiet machine.
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
    model = load_target(args.target, args.dtype, "cpu").model
    kernels = cpu_linear.kernels_here(next(model.parameters()).dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.target} {args.dtype}")
    rows = cpu_linear.measure_shapes(model, args.reps, widths, kernels)
    print("| weight [out, in] | layers | " + " | ".join(f"n={w} {' / '.join(kernels)}" for w in widths) + " |")
    print("|---|---|" + "---|" * len(widths))
    for shape in dict.fromkeys(r["shape"] for r in rows):
        cells = [r for r in rows if r["shape"] == shape]
        print(f"| {list(shape)} | {cells[0]['count']} | "
              + " | ".join(" / ".join(f"{r[k]:.3f}" for k in kernels) for r in cells) + " |")
    per_width = [[sum(r["count"] * r[k] for r in rows if r["width"] == w) for k in kernels] for w in widths]
    print("| one forward's linear layers | | " + " | ".join(" / ".join(f"{v:.1f}" for v in cell)
                                                         for cell in per_width) + " |")
    print("choice:", cpu_linear.choose(model, reps=args.reps).describe())


if __name__ == "__main__":
    main()
