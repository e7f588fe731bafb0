"""Acceptance figures of speculative decoding from per-step counts: the one definition, called by
the `evaluate` module beside this file (acceptance.py) and by the eval report (eval/metrics.py).

Why here and free of imports: evaluate loads a local module by copying its file, and the files it
imports relatively (`from .x import y`), into its own cache and importing the copies. A module that
imported `draftsmith` would load only where draftsmith is installed, and it would run code that
evaluate neither copies nor hashes; this file travels with the module instead, and draftsmith
imports it as an ordinary module of its package.

Input per request (prompt), one count per verify step (a target forward over the draft; the
prefill is not a step): `accepted` drafts the verifier accepted, `proposed` draft nodes verified
(for a tree: nodes, not depth), `depth` the longest drafted path (a chain's is `proposed`),
`emitted` tokens the step emitted (accepted + the verifier's own token, unless EOS or
max_new_tokens cut the step short). docs/metrics.md defines every figure in words.
"""

from __future__ import annotations

from collections.abc import Sequence

Counts = Sequence[Sequence[int]]
"""Per request, per verify step."""


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def request_tau(emitted: Sequence[int]) -> float | None:
    """τ of one request: tokens its verify steps emitted / its verify steps (None without steps)."""
    return _ratio(sum(emitted), len(emitted))


def step_defaults(accepted: Sequence[int], proposed: Sequence[int], depth: Sequence[int] | None = None,
                  emitted: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """One request's (depth, emitted) per step, the given ones checked and the missing ones filled
    in: a chain's depth is its proposed count; a step emits its accepted drafts plus one token."""
    depth = list(proposed if depth is None else depth)
    emitted = [a + 1 for a in accepted] if emitted is None else list(emitted)
    for name, counts in (("proposed", proposed), ("depth", depth), ("emitted", emitted)):
        if len(counts) != len(accepted):
            raise ValueError(f"{len(accepted)} accepted counts but {len(counts)} {name} counts for one request: "
                             "each list holds one count per verify step of that request")
    return depth, emitted


def acceptance_by_position(depth: Sequence[int], accepted: Sequence[int], k: int) -> list[float | None]:
    """α_i over all steps (depth[j], accepted[j] of step j): #steps with ≥ i accepted / #steps whose
    draft reached depth ≥ i and that accepted ≥ i − 1, for i = 1..k; None where no step reached
    depth i. For a tree: the chance that some node at depth i was on the accepted path."""
    steps = list(zip(depth, accepted))
    alphas = []
    for i in range(1, k + 1):
        reached = sum(1 for d, a in steps if d >= i and a >= i - 1)
        taken = sum(1 for d, a in steps if d >= i and a >= i)
        alphas.append(_ratio(taken, reached))
    return alphas


def tau_from_alphas(alphas: Sequence) -> float:
    """τ of a chain whose draft position i is accepted with probability α_i given the positions before
    it: 1 + Σ_n Π_{i≤n} α_i (bonus token included), as deep as the α given, stopping at the first None.
    For a fixed-k chain without EOS this is exactly the measured pooled τ (the products telescope to
    #steps(accepted ≥ n) / #steps); with one α repeated k times it is (1 − α^(k+1)) / (1 − α). The
    trainer's held-out prediction and training log use it (teacher-forced α, so an upper estimate)."""
    tau, reach = 1.0, 1.0
    for a in alphas:
        if a is None:
            break
        reach = reach * a
        tau = tau + reach
    return tau


def accepted_length_histogram(accepted: Sequence[int], k: int) -> list[int]:
    """How many verify steps accepted 0, 1, ..., k drafts (more than k counted at k)."""
    hist = [0] * (k + 1)
    for a in accepted:
        hist[min(a, k)] += 1
    return hist


def acceptance_figures(accepted: Counts, proposed: Counts, depth: Sequence[Sequence[int] | None] | None = None,
                       emitted: Sequence[Sequence[int] | None] | None = None, k: int | None = None) -> dict:
    """Every acceptance figure of a run (one list of per-step counts per request). `k`: positions
    α is reported for and the histogram's last bin (default: the deepest draft seen); the eval
    report passes the run's draft depth, so a depth no step reached reports α None."""
    n = len(accepted)
    if len(proposed) != n:
        raise ValueError(f"accepted counts for {n} requests but proposed counts for {len(proposed)}")
    depth = [None] * n if depth is None else depth
    emitted = [None] * n if emitted is None else emitted
    if len(depth) != n or len(emitted) != n:
        raise ValueError(f"accepted counts for {n} requests but depth for {len(depth)} and emitted for {len(emitted)}")
    filled = [step_defaults(*request) for request in zip(accepted, proposed, depth, emitted)]
    flat_depth = [d for request_depth, _ in filled for d in request_depth]
    flat_accepted = [a for request in accepted for a in request]
    if k is None:
        k = max(flat_depth, default=0)
    if not (isinstance(k, int) and k >= 0):
        raise ValueError(f"k (draft positions to report) must be an integer >= 0, got {k!r}")
    steps = len(flat_accepted)
    emitted_total = sum(sum(request_emitted) for _, request_emitted in filled)
    proposed_total = sum(sum(request) for request in proposed)
    per_request = [request_tau(request_emitted) for _, request_emitted in filled]
    taus = [t for t in per_request if t is not None]
    return {
        "tau": _ratio(emitted_total, steps),
        "tau_per_request_mean": sum(taus) / len(taus) if taus else None,
        "tau_per_request": per_request,
        "acceptance_rate": _ratio(sum(flat_accepted), proposed_total),
        "acceptance_by_position": acceptance_by_position(flat_depth, flat_accepted, k),
        "accepted_length_histogram": accepted_length_histogram(flat_accepted, k),
        "steps": steps,
        "nodes_per_step": _ratio(proposed_total, steps),
    }
