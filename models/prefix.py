"""What token-level drafters share: how much of their own KV cache still agrees with the sequence."""

from __future__ import annotations

from draftsmith.models.target import rollback


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (the drafter cache rows still valid)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def catch_up(cache, fed: list[int], tokens: list[int]) -> list[int]:
    """Roll a drafter's cache (and `fed`, the tokens it holds) back to the longest prefix that agrees with
    `tokens`, always short of the newest token; returns the tokens it must be fed next."""
    keep = min(common_prefix(fed, tokens), len(tokens) - 1)
    rollback(cache, keep)
    del fed[keep:]
    return tokens[keep:]
