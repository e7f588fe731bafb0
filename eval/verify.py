"""Verification as pure functions: warp, accept/reject, residual resample.

Speculative sampling (Leviathan et al. 2211.17192, Alg. 1; Chen et al. 2302.01318): a draft token
x ~ q is accepted with probability min(1, p(x)/q(x)); on the first rejection the output is drawn
from norm(max(0, p − q)). The emitted token then follows p exactly. Temperature, top-k and top-p
warp p and q identically before the test. Greedy decoding (temperature 0) accepts x iff
x = argmax p, which reproduces the target's own greedy output. Drafts that branch are verified by
walking the tree (eval/tree.py describes the tree; the walk is below, chains are its special case).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from draftsmith.errors import DraftsmithError
from draftsmith.eval.tree import chain_parents, children


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
    """A chain: accept the longest draft prefix equal to the target's argmax. target_logits: [k+1, V].
    Returns (n accepted, next token): a correction on rejection, the bonus token when all k pass."""
    path, nxt = verify_tree_greedy(draft, chain_parents(len(draft)), target_logits)
    return len(path), nxt


def verify_sampling(draft: list[int], q: torch.Tensor | None, p: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[int, int]:
    """A chain: speculative sampling. q: [k, V] warped draft probabilities (None: deterministic
    drafts); p: [k+1, V] warped target probabilities. Returns (n accepted, next token)."""
    path, nxt = verify_tree_sampling(draft, chain_parents(len(draft)), q, p, generator)
    return len(path), nxt


def verify_tree_greedy(tokens: list[int], parents: list[int], target_logits: torch.Tensor) -> tuple[list[int], int]:
    """target_logits: [n+1, V] (row 0 the root). Returns (accepted nodes root-down, next token)."""
    choice = target_logits.argmax(-1).tolist()
    kids = children(parents)
    path, row = [], 0
    while True:
        match = next((c for c in kids[row] if tokens[c] == choice[row]), None)
        if match is None:
            return path, choice[row]
        path.append(match)
        row = match + 1


def verify_tree_sampling(tokens: list[int], parents: list[int], q: torch.Tensor | None, p: torch.Tensor,
                         generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Recursive rejection sampling. q: [n, V] the law each node was drawn from (None: every node is
    deterministic); p: [n+1, V] warped target probabilities (row 0 the root)."""
    kids = children(parents)
    path, row = [], 0
    while True:
        law = p[row]
        for c in kids[row]:
            x = tokens[c]
            if q is None:                        # a deterministic node: q is one-hot at x
                qc = torch.zeros_like(law)
                qc[x] = 1.0
            else:
                qc = q[c]
            if float(torch.rand((), generator=generator)) < acceptance_probability(law, qc, x):
                path.append(c)
                row = c + 1
                break
            law = residual(law, qc)
        else:
            return path, sample(law, generator)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def step_law(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The exact law [V] of the first token one verify step emits, for a draft x ~ q.

    Σ_x q(x)·min(1, p(x)/q(x))·δ_x + (1 − Σ_x min(p(x), q(x)))·residual(p, q). Tests compare it with
    p; it is also what `verify_sampling` implements, step for step.
    """
    accepted = torch.minimum(p, q)
    return accepted + (1 - accepted.sum()) * residual(p, q)
