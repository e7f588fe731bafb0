"""Speedup of speculative decoding from paired timings: the one definition, called by the `evaluate`
module beside this file (speedup.py) and by the eval report (eval/metrics.py).

Why here and free of imports: evaluate loads a local module by copying its file, and the files it
imports relatively (`from .x import y`), into its own cache and importing the copies; a module that
imported `draftsmith` would load only where draftsmith is installed (see acceptance_figures.py).

Input per prompt, the same prompts for both decoders: new tokens and wall seconds of plain
(autoregressive, AR) decoding and of speculative decoding (SD). docs/metrics.md defines the figures.
"""

from __future__ import annotations

from collections.abc import Sequence


def tokens_per_s(tokens: float, seconds: float) -> float | None:
    """Tokens per wall second (None when no time was measured)."""
    return tokens / seconds if seconds else None


def speedup(ar_tokens: float, ar_s: float, sd_tokens: float, sd_s: float) -> float | None:
    """SD tokens per second over AR tokens per second, from totals over the same prompts. Under greedy
    decoding both emit the same tokens, so this is total AR seconds / total SD seconds."""
    ar_rate = tokens_per_s(ar_tokens, ar_s)
    return (tokens_per_s(sd_tokens, sd_s) or 0.0) / ar_rate if ar_rate else None


def speedup_figures(ar_tokens: Sequence[int], ar_s: Sequence[float], sd_tokens: Sequence[int],
                    sd_s: Sequence[float]) -> dict:
    """Pooled over prompts (totals, not a mean of per-prompt ratios): a long prompt weighs by its time."""
    n = len(ar_tokens)
    if not len(ar_s) == len(sd_tokens) == len(sd_s) == n:
        raise ValueError(f"paired timings need one value per prompt in each list; got {n} ar_tokens, "
                         f"{len(ar_s)} ar_s, {len(sd_tokens)} sd_tokens, {len(sd_s)} sd_s")
    totals = (sum(ar_tokens), sum(ar_s), sum(sd_tokens), sum(sd_s))
    return {"speedup": speedup(*totals),
            "ar_tokens_per_s": tokens_per_s(totals[0], totals[1]),
            "sd_tokens_per_s": tokens_per_s(totals[2], totals[3])}
