"""Why the target's cost curve bends at 4 tokens on this CPU: fp32 linear layers by input width, default kernel
vs MKL weights packed for that width.

SmolLM2-135M's MLP weights of all 30 layers (gate, up: 1536 x 576; down: 576 x 1536; ~318 MB, so every
weight comes from memory as in a real forward), one forward over n rows per layer, ms per forward:
`default` = torch.nn.functional.linear (what eager and the compiled 2..64-token graph run); `packed for n` =
torch.ops.mkl._mkl_linear with the weights reordered for batch size n (what inductor's freezing emits for
a graph with a static batch size); `packed for P` (P != n) shows that a packing serves its own width only.

    python bench/linear_widths.py --widths 1,2,3,4,6,8,16 --pack-for 4,8
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="1,2,3,4,6,8,16")
    ap.add_argument("--pack-for", default="4,8", help="fixed packings to run at every width")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    widths = [int(w) for w in args.widths.split(",")]
    fixed = [int(p) for p in args.pack_for.split(",") if p]
    weights = [(torch.randn(1536, 576), torch.randn(1536, 576), torch.randn(576, 1536)) for _ in range(args.layers)]

    def default(n: int) -> None:
        x = torch.randn(n, 576)
        for gate, up, down in weights:
            torch.nn.functional.linear(torch.nn.functional.linear(x, gate) * torch.nn.functional.linear(x, up), down)

    def packed(p: int):
        packs = [tuple(torch.ops.mkl._mkl_reorder_linear_weight(w, p) for w in trio) for trio in weights]

        def run(n: int) -> None:
            x = torch.randn(n, 576)
            for (pg, pu, pd), (gate, up, down) in zip(packs, weights):
                h = torch.ops.mkl._mkl_linear(x, pg, gate, None, p) * torch.ops.mkl._mkl_linear(x, pu, up, None, p)
                torch.ops.mkl._mkl_linear(h, pd, down, None, p)
        return run

    def ms(fn, n: int) -> float:
        fn(n)
        started = time.perf_counter()
        for _ in range(args.repeats):
            fn(n)
        return (time.perf_counter() - started) / args.repeats * 1e3

    with torch.inference_mode():
        rows = {"default": [ms(default, n) for n in widths]}
        own = []
        for n in widths:
            own.append(ms(packed(n), n))
        rows["packed for n"] = own
        for p in fixed:
            rows[f"packed for {p}"] = [ms(packed(p), n) for n in widths]
    print(f"fp32 MLP linears of {args.layers} SmolLM2-135M layers, ms per forward over n rows, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| kernel | " + " | ".join(f"n={n}" for n in widths) + " |")
    print("|---|" + "---|" * len(widths))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")


if __name__ == "__main__":
    main()
