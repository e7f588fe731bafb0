"""The figures a report holds, computed in one place (docs/metrics.md defines each in words)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PromptRecord:
    """Everything measured for one prompt: the baseline, draftsmith's decoder, HF assisted."""

    id: str
    turn: int
    prompt_tokens: int
    ar_tokens: list[int]
    ar_s: float
    sd_tokens: list[int]
    sd_s: float
    proposed: list[int]
    accepted: list[int]
    emitted: list[int]
    hf_tokens: list[int] | None = None
    hf_s: float | None = None
    divergence: dict | None = None        # greedy only: where SD first differs from the baseline
    hf_divergence: dict | None = None
    extra: dict = field(default_factory=dict)
    depth: list[int] | None = None         # longest drafted path per step (= proposed for chains)
    draft_s: float = 0.0                   # seconds drafting, and in the target's verify forwards
    verify_s: float = 0.0
    timing_order: str = "ar,sd"            # which decoder ran first (eval/harness.py alternates it per prompt)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def speedup(ar_tokens: int, ar_s: float, sd_tokens: int, sd_s: float) -> float | None:
    """Tokens per second of speculative decoding over plain decoding's, over the same prompts."""
    return _ratio(_ratio(sd_tokens, sd_s) or 0.0, _ratio(ar_tokens, ar_s) or 0.0)


def acceptance_by_position(records: list[PromptRecord], k: int) -> list[float | None]:
    """α_i: P(a token at depth i accepted | depths < i accepted), over steps that drafted depth i
    (for a tree: the chance that some node at depth i was accepted)."""
    alphas = []
    for i in range(1, k + 1):
        steps = [(p, a) for r in records for p, a in zip(r.depth or r.proposed, r.accepted)]
        reached = sum(1 for p, a in steps if p >= i and a >= i - 1)
        accepted = sum(1 for p, a in steps if p >= i and a >= i)
        alphas.append(_ratio(accepted, reached))
    return alphas


def accepted_length_histogram(records: list[PromptRecord], k: int) -> list[int]:
    """How many verify steps accepted 0, 1, ..., k drafts."""
    hist = [0] * (k + 1)
    for r in records:
        for a in r.accepted:
            hist[min(a, k)] += 1
    return hist


def summarize(records: list[PromptRecord], k: int, greedy: bool) -> dict:
    steps = sum(len(r.emitted) for r in records)
    emitted = sum(sum(r.emitted) for r in records)
    proposed = sum(sum(r.proposed) for r in records)
    accepted = sum(sum(r.accepted) for r in records)
    per_request = [sum(r.emitted) / len(r.emitted) for r in records if r.emitted]
    ar_tokens = sum(len(r.ar_tokens) for r in records)
    sd_tokens = sum(len(r.sd_tokens) for r in records)
    ar_s = sum(r.ar_s for r in records)
    sd_s = sum(r.sd_s for r in records)
    ar_tps, sd_tps = _ratio(ar_tokens, ar_s), _ratio(sd_tokens, sd_s)
    hf = [r for r in records if r.hf_s is not None]
    hf_tps = _ratio(sum(len(r.hf_tokens) for r in hf), sum(r.hf_s for r in hf)) if hf else None
    return {
        "tau": _ratio(emitted, steps),
        "tau_per_request_mean": sum(per_request) / len(per_request) if per_request else None,
        "acceptance_rate": _ratio(accepted, proposed),
        "acceptance_by_position": acceptance_by_position(records, k),
        "accepted_length_histogram": accepted_length_histogram(records, k),
        "steps": steps,
        "new_tokens": sd_tokens,
        "ar_new_tokens": ar_tokens,
        "ar_tokens_per_s": ar_tps,
        "sd_tokens_per_s": sd_tps,
        "speedup": speedup(ar_tokens, ar_s, sd_tokens, sd_s),
        "draft_ms_per_step": _ratio(sum(r.draft_s for r in records) * 1e3, steps),
        "verify_ms_per_step": _ratio(sum(r.verify_s for r in records) * 1e3, steps),
        "nodes_per_step": _ratio(proposed, steps),
        "hf_assisted_tokens_per_s": hf_tps,
        "hf_assisted_speedup": _ratio(hf_tps, ar_tps) if hf_tps else None,
        "lossless_match_rate": (sum(r.sd_tokens == r.ar_tokens for r in records) / len(records)
                                if greedy and records else None),
        "hf_assisted_match_rate": (sum(r.hf_tokens == r.ar_tokens for r in hf) / len(hf)
                                   if greedy and hf else None),
        # greedy: prompts that differ from the baseline at a position where the target's top-2
        # logits are NOT a numerical near-tie; anything above 0 is a defect
        "divergences_not_near_tie": (sum(1 for r in records if r.divergence and not r.divergence["near_tie"])
                                     if greedy else None),
        "num_prompts": len(records),
    }


def first_divergence(reference: list[int], other: list[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are equal."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x
