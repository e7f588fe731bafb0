"""Does a verify forward compute each row as plain decoding does, bit for bit? Counted on the real target.

    python -m draftsmith.bench.verify_exactness --dtype bf16 --prompts 81,90 --tokens 60 [--linear-kernel rows]

For each MT-bench prompt, plain decoding runs `--tokens` single-token forwards through the compiled target and keeps
every logit row; then, at each of those positions, from plain decoding's own cache:
- chains: a verify of plain decoding's next w tokens (w = 2, 3, 4, 6, 9): row j must equal plain decoding's logits
  at position + j;
- trees: [root, r wrong first tokens, the right one, its right child] with the right token as the root's (r+1)-th
  child (r = 1, 2, 3: the second, third and fourth child, which a tree puts r lanes further, models/compiled_target.py
  `tree_slots`): the rows of the right token and of its child must equal plain decoding's (the root's row is a
  chain's and counted with the chains). A tree the compiled cache cannot place so whole (Target.placeable: the
  decoder verifies the nodes that fit) is counted as refused.
It prints how many rows differ and by how much at most, with the row-invariant attention (`rows`, what --compile
runs on a CPU) and with transformers' sdpa (`sdpa`), each in its own compiled target. A row that differs is where a
greedy near-tie can flip: the cause of bf16 divergences from plain decoding.
"""

from __future__ import annotations

import argparse

import torch

from draftsmith.eval.benchmarks import load_bench
from draftsmith.eval.harness import encode_turn
from draftsmith.models.target import load_target

CHAINS = (2, 3, 4, 6, 9)
SIBLINGS = (1, 2, 3)
"""The right token's rank among the root's children in the trees counted: 1 the second child, ..."""
KINDS = ("chain",) + tuple(f"child{r + 1}" for r in SIBLINGS)
"""The rows counted: chains (and roots), and the rows through each SIBLINGS child."""


def count(target, prompt: list[int], tokens: int) -> dict:
    """Differing rows of chain and tree verifies against plain decoding's single-token forwards."""
    cache = target.new_cache()
    plain_logits = [target.forward(prompt, cache, last_only=True).logits[-1]]
    plain = [int(plain_logits[0].argmax())]
    for _ in range(tokens + 3):
        plain_logits.append(target.forward([plain[-1]], cache).logits[0])
        plain.append(int(plain_logits[-1].argmax()))
    cache = target.new_cache()
    target.forward(prompt, cache, last_only=True)
    found = {f"{kind}_{what}": 0 for kind in KINDS for what in ("rows", "differ", "refused")} | {
        f"{k}_max": 0.0 for k in KINDS}

    def check(kind: str, row: torch.Tensor, ref: torch.Tensor) -> None:
        found[f"{kind}_rows"] += 1
        if not torch.equal(row, ref):
            found[f"{kind}_differ"] += 1
            found[f"{kind}_max"] = max(found[f"{kind}_max"], (row - ref).abs().max().item())

    for i in range(tokens - max(CHAINS)):
        length = cache.length
        for w in CHAINS:
            out = target.forward(plain[i:i + w], cache).logits
            target.rollback(cache, length)
            for j in range(w):
                check("chain", out[j], plain_logits[i + j + 1])
        for r in SIBLINGS:
            wrong = [(plain[i + 1] + 1 + x) % target.vocab_size for x in range(r)]
            parents = [-1] * (r + 1) + [r]
            if len(target.placeable(parents, cache)) < len(parents):   # the decoder verifies the nodes that fit
                found[f"child{r + 1}_refused"] += 1
                continue
            out = target.forward([plain[i]] + wrong + [plain[i + 1], plain[i + 2]], cache, parents=parents).logits
            target.rollback(cache, length)
            check("chain", out[0], plain_logits[i + 1])         # the root: a chain's first row
            for j, ref in ((r + 1, plain_logits[i + 2]), (r + 2, plain_logits[i + 3])):
                check(f"child{r + 1}", out[j], ref)
        target.forward([plain[i]], cache)           # plain decoding's step: the cache moves on as plain's
    return found


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--bench", default="mt_bench")
    p.add_argument("--prompts", default="81,90", help="prompt ids of --bench")
    p.add_argument("--tokens", type=int, default=60)
    p.add_argument("--attention", default="rows,sdpa")
    p.add_argument("--linear-kernel", default="auto", help="auto (the fastest here), mm, onednn or rows: "
                   "models/cpu_linear.py")
    args = p.parse_args(argv)
    unknown = set(args.attention.split(",")) - {"rows", "sdpa"}
    if unknown:
        raise SystemExit(f"--attention takes rows and/or sdpa, not {sorted(unknown)}: e.g. --attention rows,sdpa")
    if args.tokens <= max(CHAINS):
        raise SystemExit(f"--tokens must be over {max(CHAINS)}, not {args.tokens}")
    target = load_target(args.target, args.dtype, "cpu")
    wanted = args.prompts.split(",")
    items = {i.id: i for i in load_bench(args.bench) if i.id in wanted}
    missing = [w for w in wanted if w not in items]
    if missing:
        raise SystemExit(f"no prompt {missing} in {args.bench}: give ids it has (its report's prompts[].id)")
    prompts = [encode_turn(target, items[w].turns[:1], []) for w in wanted]
    print(f"{args.target} {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; prompts {wanted}")
    print("| attention | chain rows differing (max) | "
          + " | ".join(f"tree rows through child {r + 1} (max)" for r in SIBLINGS) + " |")
    print("|---|---|" + "---|" * len(SIBLINGS))
    for attention in args.attention.split(","):
        torch._dynamo.reset()
        target.compile(max(map(len, prompts)) + args.tokens + 16, linear_kernel=args.linear_kernel,
                       row_invariant=attention == "rows")
        print(f"({attention}: {target.compiled.describe()})", flush=True)
        total: dict = {}
        for prompt in prompts:
            for k, v in count(target, prompt, args.tokens).items():
                total[k] = max(total.get(k, 0), v) if k.endswith("max") else total.get(k, 0) + v
        cells = [f"{total[k + '_differ']} / {total[k + '_rows']} ({total[k + '_max']:.3g})"
                 + (f", {total[k + '_refused']} trees refused" if k != "chain" else "") for k in KINDS]
        print(f"| {attention} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
