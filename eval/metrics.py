"""The figures a report holds (docs/metrics.md defines each in words). Acceptance and speedup are
computed by the functions of draftsmith's `evaluate` modules (metric_modules/<name>/<name>_figures.py),
the one definition both `evaluate.load` and the report use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from draftsmith.metric_modules.acceptance.acceptance_figures import acceptance_figures
from draftsmith.metric_modules.speedup.speedup_figures import speedup, speedup_figures, tokens_per_s


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
    unplaced: int = 0                      # draft nodes left out to keep every verified row exact (GenerationResult)
    timing_order: str = "ar,sd"            # which decoder ran first (eval/harness.py alternates it per prompt)
    # (depth, predicted, accepted) per verified node whose parent was accepted, when the drafter predicts its
    # own acceptance (a confidence head: GenerationResult.predicted); empty otherwise
    predicted: list = field(default_factory=list)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


CALIBRATION_TOLERANCE = 0.05
"""A position is calibrated when |predicted - measured| is at most this (issue 19), or when the prediction lies
inside the measured share's 95% interval (too few nodes there to tell a miss from noise)."""


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial share (95% at z = 1.96): sound at small n and near 0 or 1,
    where the normal approximation is not."""
    if n == 0:
        return 0.0, 1.0
    share = successes / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def reliability_by_position(predicted) -> list[dict]:
    """The confidence head's reliability per draft position from (depth, predicted, accepted) triples: over
    the reached nodes at position i (their parent accepted), the mean predicted acceptance, the share
    accepted with its 95% (Wilson) interval, their count, |predicted - measured| and whether that is
    calibrated (CALIBRATION_TOLERANCE)."""
    sums: dict[int, list] = {}
    for depth, p, ok in predicted:
        s = sums.setdefault(int(depth), [0.0, 0, 0])
        s[0], s[1], s[2] = s[0] + float(p), s[1] + bool(ok), s[2] + 1
    rows = []
    for depth, (p, ok, n) in sorted(sums.items()):
        lo, hi = wilson_interval(ok, n)
        gap = abs(p / n - ok / n)
        rows.append({"position": depth, "predicted": p / n, "measured": ok / n, "count": n, "abs_gap": gap,
                     "measured_ci95": [lo, hi], "calibrated": gap <= CALIBRATION_TOLERANCE or lo <= p / n <= hi})
    return rows


def summarize(records: list[PromptRecord], k: int, greedy: bool) -> dict:
    """The report's figures over the prompts done. Acceptance and speedup come from the `evaluate`
    modules' own functions (metric_modules/), so the report and `evaluate.load` agree by construction."""
    acceptance = acceptance_figures([r.accepted for r in records], [r.proposed for r in records],
                                    [r.depth or None for r in records], [r.emitted for r in records], k=k)
    pace = speedup_figures([len(r.ar_tokens) for r in records], [r.ar_s for r in records],
                           [len(r.sd_tokens) for r in records], [r.sd_s for r in records])
    steps = acceptance["steps"]
    hf = [r for r in records if r.hf_s is not None]
    hf_tokens, hf_s = sum(len(r.hf_tokens) for r in hf), sum(r.hf_s for r in hf)
    hf_tps = tokens_per_s(hf_tokens, hf_s) if hf else None
    ar_tokens, ar_s = sum(len(r.ar_tokens) for r in records), sum(r.ar_s for r in records)
    reliability = reliability_by_position([x for r in records for x in r.predicted])
    reached = sum(r["count"] for r in reliability)
    return {
        "tau": acceptance["tau"],
        "tau_per_request_mean": acceptance["tau_per_request_mean"],
        "acceptance_rate": acceptance["acceptance_rate"],
        "acceptance_by_position": acceptance["acceptance_by_position"],
        "accepted_length_histogram": acceptance["accepted_length_histogram"],
        "steps": steps,
        "new_tokens": sum(len(r.sd_tokens) for r in records),
        "ar_new_tokens": ar_tokens,
        "ar_tokens_per_s": pace["ar_tokens_per_s"],
        "sd_tokens_per_s": pace["sd_tokens_per_s"],
        "speedup": pace["speedup"],
        "draft_ms_per_step": _ratio(sum(r.draft_s for r in records) * 1e3, steps),
        "verify_ms_per_step": _ratio(sum(r.verify_s for r in records) * 1e3, steps),
        "nodes_per_step": acceptance["nodes_per_step"],
        "unplaced_nodes_per_step": _ratio(sum(r.unplaced for r in records), steps),
        "hf_assisted_tokens_per_s": hf_tps,
        "hf_assisted_speedup": speedup(ar_tokens, ar_s, hf_tokens, hf_s) if hf_tps else None,
        "lossless_match_rate": (sum(r.sd_tokens == r.ar_tokens for r in records) / len(records)
                                if greedy and records else None),
        "hf_assisted_match_rate": (sum(r.hf_tokens == r.ar_tokens for r in hf) / len(hf)
                                   if greedy and hf else None),
        # greedy: prompts that differ from the baseline at a position where the target's top-2
        # logits are NOT a numerical near-tie; anything above 0 is a defect
        "divergences_not_near_tie": (sum(1 for r in records if r.divergence and not r.divergence["near_tie"])
                                     if greedy else None),
        "num_prompts": len(records),
        # a drafter with a confidence head: its predicted acceptance against the verifier's, per position
        "confidence_reliability": reliability or None,
        "confidence_abs_gap": _ratio(sum(r["abs_gap"] * r["count"] for r in reliability), reached),
        "confidence_calibrated": all(r["calibrated"] for r in reliability) if reliability else None,
    }


def first_divergence(reference: list[int], other: list[int]) -> int | None:
    """Index of the first differing token, or None when the sequences are equal."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    return None if len(reference) == len(other) else min(len(reference), len(other))


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x
