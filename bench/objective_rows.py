"""Seconds and peak memory of one forward + backward of `Objective.rows` (distill/objective.py) over M rows of
a V-word vocabulary: PARD's full-vocabulary rows (2,560 x 49,152) and an eagle3 TTT step's (1,024 x 8,192).

    python bench/objective_rows.py --rows 2560 --vocab 49152 --repeats 3

One configuration per process (peak RSS is the process's); run it on a quiet machine. `--one-slice` runs the
rows in one slice (CHUNK_ELEMENTS = 2^30) instead of the default 2^20-logit slices.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import draftsmith.distill.objective as objective


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2560)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one-slice", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one_slice:
        objective.CHUNK_ELEMENTS = 1 << 30
    torch.manual_seed(0)
    t_logits = torch.randn(args.rows, args.vocab)
    obj = objective.Objective()
    times = []
    for _ in range(args.repeats):
        d_logits = torch.randn(args.rows, args.vocab, requires_grad=True)
        started = time.perf_counter()
        loss, _ = obj.rows(t_logits, d_logits)
        loss.sum().backward()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    slices = "one slice" if args.one_slice else f"slices of {objective.CHUNK_ELEMENTS} logits"
    print(f"rows {args.rows} x vocab {args.vocab}, {slices}: forward+backward s "
          f"{' '.join(f'{t:.2f}' for t in times)} (min {min(times):.2f}); peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
