"""Prompt lookup: shortest n-gram to match (min_ngram 1 vs 2) against plain decoding, SmolLM2 target.

    python bench/prompt_lookup_ngram.py [--num-prompts 8] [--max-new-tokens 96]
Interleaves AR and both variants per prompt (one warm-up first) and prints tokens/s and τ for each.
"""

import argparse
import time

from draftsmith.eval.benchmarks import load_bench
from draftsmith.eval.decoder import autoregressive_generate, speculative_generate
from draftsmith.eval.harness import encode_turn, eos_ids
from draftsmith.models import load_target
from draftsmith.models.prompt_lookup import PromptLookupProposer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    args = p.parse_args()
    target = load_target("smollm2-135m-instruct")
    eos = eos_ids(target)
    prompts = [encode_turn(target, item.turns, []) for item in load_bench("mt_bench", args.num_prompts)]
    autoregressive_generate(target, prompts[0], max_new_tokens=8)
    variants = [("ar", None), ("min_ngram=1", PromptLookupProposer(3, 1)), ("min_ngram=2", PromptLookupProposer(3, 2))]
    totals = {name: [0.0, 0, 0] for name, _ in variants}
    for prompt in prompts:
        for name, proposer in variants:
            start = time.perf_counter()
            if proposer is None:
                r = autoregressive_generate(target, prompt, max_new_tokens=args.max_new_tokens, eos_token_ids=eos)
            else:
                r = speculative_generate(target, proposer, prompt, k=4, max_new_tokens=args.max_new_tokens,
                                         eos_token_ids=eos)
            totals[name][0] += time.perf_counter() - start
            totals[name][1] += len(r.tokens)
            totals[name][2] += r.steps
    ar_rate = totals["ar"][1] / totals["ar"][0]
    for name, (seconds, tokens, steps) in totals.items():
        tau = (tokens - len(prompts)) / steps if steps else float("nan")
        print(f"{name:12s} {tokens / seconds:6.2f} tok/s  τ {tau:.3f}  {tokens / seconds / ar_rate:.2f}x AR")


if __name__ == "__main__":
    main()
