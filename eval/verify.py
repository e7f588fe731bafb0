"""Verification as pure functions: warp, accept/reject, residual resample.

Speculative sampling (Leviathan et al. 2211.17192, Alg. 1; Chen et al. 2302.01318): a draft token
x ~ q is accepted with probability min(1, p(x)/q(x)); on the first rejection the output is drawn
from norm(max(0, p − q)). The emitted token then follows p exactly. Temperature, top-k and top-p
warp p and q identically before the test. Greedy decoding (temperature 0) accepts x iff
x = argmax p, which reproduces the target's own greedy output.
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
        if not self.temperature >= 0:
            raise DraftsmithError("temperature must be >= 0 (0 means greedy)", self.temperature)
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


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p − q)) [V]: the law of the token emitted after a rejection.

    When p == q a rejection has probability 0; p is returned so the function stays total.
    """
    r = (p - q).clamp_min(0)
    total = r.sum()
    return p if total <= 0 else r / total


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> float:
    """min(1, p(x)/q(x)) for a draft token x drawn from q (q(x) > 0 by construction)."""
    qx = float(q[token])
    return 1.0 if qx <= 0 else min(1.0, float(p[token]) / qx)


def verify_greedy(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Accept the longest draft prefix equal to the target's argmax. target_logits: [k+1, V].

    Returns (n accepted, next token): the target's argmax after the accepted prefix (a correction
    on rejection, the bonus token when all k were accepted).
    """
    choice = target_logits.argmax(-1).tolist()  # [k+1]
    n = 0
    while n < len(draft) and draft[n] == choice[n]:
        n += 1
    return n, choice[n]


def verify_sampling(draft: list[int], q: torch.Tensor | None, p: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[int, int]:
    """Speculative sampling over a chain. q: [k, V] warped draft probabilities (None: the draft was
    deterministic, i.e. q is one-hot at each draft token); p: [k+1, V] warped target probabilities.

    Returns (n accepted, next token) with the next token drawn from the residual after a rejection
    or from p[k] (the bonus position) when every draft was accepted.
    """
    k = len(draft)
    if q is None:
        q = torch.nn.functional.one_hot(torch.tensor(draft, dtype=torch.long), p.shape[-1]).float()
    u = torch.rand(k, generator=generator).tolist() if k else []
    for i, x in enumerate(draft):
        if u[i] < acceptance_probability(p[i], q[i], x):
            continue
        return i, sample(residual(p[i], q[i]), generator)
    return k, sample(p[k], generator)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def step_law(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The exact law [V] of the first token one verify step emits, for a draft x ~ q.

    Σ_x q(x)·min(1, p(x)/q(x))·δ_x + (1 − Σ_x min(p(x), q(x)))·residual(p, q). Tests compare it with
    p; it is also what `verify_sampling` implements, step for step.
    """
    accepted = torch.minimum(p, q)
    return accepted + (1 - accepted.sum()) * residual(p, q)
