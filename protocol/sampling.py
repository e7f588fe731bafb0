"""How tokens are drawn, on both sides of a verify step: the proposer draws a draft token from the
warped law q, the verifier warps the target's p the same way (eval/verify.py). Temperature, top-k
and top-p warp p and q identically, so the test min(1, p(x)/q(x)) compares laws of one kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftsmith.errors import DraftsmithError


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen. temperature 0 is greedy; top_k None / top_p 1.0 are off."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):    # NaN fails every comparison
            raise DraftsmithError("temperature must be >= 0 and finite (0 means greedy)", self.temperature)
        if not 0 < self.top_p <= 1:
            raise DraftsmithError("top_p must lie in (0, 1]", self.top_p, "Use 1.0 to turn it off")
        if self.top_k is not None and self.top_k < 1:
            raise DraftsmithError("top_k must be >= 1", self.top_k, "Use null/None to turn it off")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Logits [..., V] -> probabilities [..., V] after temperature, top-k, then top-p (float32).

    Greedy sampling returns the one-hot of the argmax, so the same code serves both modes.
    """
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if sampling.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))
