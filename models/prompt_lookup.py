"""Prompt lookup (n-gram) drafting: a training-free baseline.

The drafter finds the most recent earlier occurrence of the sequence's last n tokens (longest n
first, from `max_ngram` down to `min_ngram`) and proposes the tokens that followed it (Saxena 2023,
"prompt lookup decoding"; transformers' `prompt_lookup_num_tokens`). A deterministic drafter: its
draft distribution q is one-hot, which the verifier handles exactly.

The default shortest match is a bigram: on a CPU a 5-token verify costs ~1.4x a 1-token forward,
and unigram matches are accepted too rarely to pay for it (8 MT-bench prompts, 96 tokens, SmolLM2:
min_ngram=1 0.99x AR, min_ngram=2 1.07x AR; bench/prompt_lookup_ngram.py).
"""

from __future__ import annotations

from draftsmith.eval.decoder import DecodeState, Draft, Sampler


def lookup(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Up to k tokens that followed the most recent earlier match of the longest suffix n-gram."""
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        suffix = tokens[n_tokens - n:]
        first = suffix[0]
        # scan right to left, excluding the suffix itself
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start] == first and tokens[start:start + n] == suffix:
                return tokens[start + n: start + n + k]
    return []


class PromptLookupProposer:
    hidden_layers: tuple[int, ...] = ()

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self) -> None:
        pass

    def observe(self, state: DecodeState) -> None:
        pass

    def propose(self, state: DecodeState, k: int, sampler: Sampler) -> Draft:
        return Draft(lookup(state.tokens, k, self.max_ngram, self.min_ngram))

    def hf_assisted_kwargs(self, k: int) -> dict:
        """transformers' own prompt lookup with the same draft length and longest n-gram."""
        return {"prompt_lookup_num_tokens": k, "max_matching_ngram_size": self.max_ngram}

