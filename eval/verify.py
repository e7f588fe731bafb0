"""Verification as pure functions: warp, accept/reject, residual resample.

Speculative sampling (Leviathan et al. 2211.17192, Alg. 1; Chen et al. 2302.01318): a draft token
x ~ q is accepted with probability min(1, p(x)/q(x)); on the first rejection the output is drawn
from norm(max(0, p − q)). The emitted token then follows p exactly. Temperature, top-k and top-p
warp p and q identically before the test. Greedy decoding (temperature 0) accepts x iff
x = argmax p, which reproduces the target's own greedy output. Drafts that branch are verified by
walking the tree (protocol/tree.py describes the tree; the walk is below, chains are its special case).
"""

from __future__ import annotations

import torch

from draftsmith.protocol.sampling import sample
from draftsmith.protocol.tree import chain_parents, children


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


def step_law(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The exact law [V] of the first token one verify step emits, for a draft x ~ q.

    Σ_x q(x)·min(1, p(x)/q(x))·δ_x + (1 − Σ_x min(p(x), q(x)))·residual(p, q). Tests compare it with
    p; it is also what `verify_sampling` implements, step for step.
    """
    accepted = torch.minimum(p, q)
    return accepted + (1 - accepted.sum()) * residual(p, q)
