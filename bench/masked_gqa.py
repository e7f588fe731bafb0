"""What letting torch's sdpa take grouped KV heads with a mask saves on a CPU target's verify forward.

transformers copies the KV cache into every query head (`repeat_kv`) for a masked forward of a
grouped-query model unless TRANSFORMERS_SDPA_FORCE_GQA=1; a draftsmith CPU Target sets it
(models/target.py: `use_masked_gqa`). This times the target's forward over n new tokens after
`--context` cached ones with the switch off and on, in interleaved rounds (median), and checks that the
logits of every size and of a small tree are bit-identical.

    python bench/masked_gqa.py --target smollm2-135m-instruct --context 128 --rounds 30

Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from draftsmith.models import load_target

SIZES = (1, 2, 3, 4, 6, 8)
FLAGS = ("0", "1")


TREE = [-1, -1, 0, 1, 2]      # parents of a 5-node tree verified after the root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    for name in ("context", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    target = load_target(args.target)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.vocab_size, (args.context + max(SIZES),), generator=g).tolist()
    prefix, new = ids[: args.context], ids[args.context:]
    cache = target.new_cache()
    target.forward(prefix, cache, last_only=True)
    logits = {}
    for flag in FLAGS:
        os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = flag
        for n in SIZES:
            logits[flag, n] = target.forward(new[:n], cache).logits
            target.rollback(cache, args.context)
        logits[flag, "tree"] = target.forward(new[: len(TREE) + 1], cache, parents=TREE).logits
        target.rollback(cache, args.context)
    identical = all(torch.equal(logits["0", key], logits["1", key]) for key in [*SIZES, "tree"])
    times = {(flag, n): [] for flag in FLAGS for n in SIZES}
    for _ in range(args.rounds):
        for n in SIZES:
            for flag in FLAGS:
                os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = flag
                start = time.perf_counter()
                target.forward(new[:n], cache)
                times[flag, n].append(time.perf_counter() - start)
                target.rollback(cache, args.context)
    med = {key: sorted(v)[len(v) // 2] * 1e3 for key, v in times.items()}
    print(f"{args.target}, {target.dtype}, {target.device}, torch threads {torch.get_num_threads()}, "
          f"{args.context} cached tokens, median of {args.rounds} interleaved rounds")
    print("| new tokens | " + " | ".join(str(n) for n in SIZES) + " |")
    print("|---|" + "---|" * len(SIZES))
    for flag, name in zip(FLAGS, ("repeat_kv (transformers' default)", "masked GQA (draftsmith's CPU Target)")):
        print(f"| {name}, ms | " + " | ".join(f"{med[flag, n]:.1f}" for n in SIZES) + " |")
    for flag, name in zip(FLAGS, ("repeat_kv", "masked GQA")):
        print(f"| {name}, / 1 token | " + " | ".join(f"{med[flag, n] / med[flag, 1]:.2f}" for n in SIZES) + " |")
    print(f"logits bit-identical (sizes {', '.join(map(str, SIZES))} and a 5-node tree): {identical}")


if __name__ == "__main__":
    main()
