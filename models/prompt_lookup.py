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

from draftsmith.protocol.drafting import Draft, TreeShape
from draftsmith.protocol.proposer import DecodeState, Sampler


def lookup(tokens: list[int], k: int, max_ngram: int = 3, min_ngram: int = 2, matches: int = 1) -> list[list[int]]:
    """Up to `matches` distinct continuations (k tokens at most) of the most recent earlier matches
    of the sequence's suffix n-gram: longest n first, most recent match first."""
    n_tokens = len(tokens)
    found: list[list[int]] = []
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        suffix = tokens[n_tokens - n:]
        first = suffix[0]
        # scan right to left, excluding the suffix itself
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start] == first and tokens[start:start + n] == suffix:
                follow = tokens[start + n: start + n + k]
                if follow and not any(f[:len(follow)] == follow for f in found):
                    found.append(follow)
                    if len(found) >= matches:
                        return found
    return found


def trie(branches: list[list[int]]) -> tuple[list[int], list[int]]:
    """Merge token sequences into one tree (tokens, parents), shared prefixes once, first branch first."""
    tokens, parents = [], []
    node_of: dict[tuple[int, ...], int] = {}
    for branch in branches:
        for depth in range(1, len(branch) + 1):
            key = tuple(branch[:depth])
            if key not in node_of:
                tokens.append(branch[depth - 1])
                parents.append(node_of.get(key[:-1], -1))
                node_of[key] = len(tokens) - 1
    return tokens, parents


class PromptLookupProposer:
    hidden_layers: tuple[int, ...] = ()

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self) -> None:
        pass

    def observe(self, state: DecodeState) -> None:
        pass

    def propose(self, state: DecodeState, k: int, sampler: Sampler, tree: TreeShape | None = None) -> Draft:
        """A chain from the best match; with a tree, one branch per distinct match (up to tree.topk)."""
        found = lookup(state.tokens, k, self.max_ngram, self.min_ngram, 1 if tree is None else tree.topk)
        if tree is None:
            return Draft(found[0] if found else [])
        tokens, parents = trie(found)
        return Draft(tokens, parents=parents)

    def hf_assisted_kwargs(self, k: int) -> dict:
        """transformers' own prompt lookup with the same draft length and longest n-gram."""
        return {"prompt_lookup_num_tokens": k, "max_matching_ngram_size": self.max_ngram}
