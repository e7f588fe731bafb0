"""Distillation losses as pure functions over logits.

`p` is the target's next-token distribution, `q` the drafter's. Every divergence names its
direction: forward KL(p‖q) is an expectation under p (mass-covering), reverse KL(q‖p) an
expectation under q (mode-seeking). DistillSpec (Zhou et al. 2310.08461) compares them and
finds the best choice depends on the decoding mode; TVD is the one that tracks acceptance
directly, since per-token acceptance β = Σ_x min(p, q) = 1 − TV(p, q) (Leviathan et al.
2211.17192; METHODS.md).

Conventions shared by every function here:
- logits are [..., V] (e.g. [B, T, V]); `mask` is [...] (e.g. [B, T]), bool or float.
  A float mask weights positions (a weighted mean); 0 drops a position. Dropped positions
  are removed BEFORE any arithmetic, so inf/nan there cannot leak into the result or the
  gradient. With no mask every position counts. With no kept position the result is 0.
- The result is a scalar: the (weighted) mean over kept positions of a per-position value.
- Target logits are detached: no gradient ever reaches the target.
- `temperature` divides both logits before the softmax. No T² factor is applied.
- Arithmetic runs in float32 whatever the input dtype (bf16 logits lose the tail of p).
- Nothing here shifts sequences: position t of the drafter is compared with position t of
  the target (or `labels[t]`); aligning "logits at t predict token t+1" is the caller's job.

The target-signal losses share one call shape, `fn(target_logits, drafter_logits, mask=None,
temperature=1.0)`; `data_ce` alone takes `(drafter_logits, labels, mask=None)`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from draftsmith.errors import DraftsmithError

IGNORE_INDEX = -100
"""A label equal to this is skipped by `data_ce`, as in `F.cross_entropy`."""


# --------------------------------------------------------------------------- helpers


def _rows(
    logits: tuple[torch.Tensor, ...], mask: torch.Tensor | None
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Flatten [..., V] tensors to the kept rows [M, V]; return the float weights [M] or None.

    Selecting rows first keeps masked positions (possibly inf/nan) out of all arithmetic and
    avoids computing softmaxes over rows that would be thrown away.
    """
    lead = logits[0].shape[:-1]
    for t in logits[1:]:
        if t.shape[:-1] != lead:
            raise DraftsmithError(
                "target and drafter logits must share their leading shape [..., V]",
                seen=(tuple(logits[0].shape), tuple(t.shape)),
                fix="Compare the same positions of both models",
            )
    flat = tuple(t.reshape(-1, t.shape[-1]) for t in logits)
    if mask is None:
        return flat, None
    if mask.shape != lead:
        raise DraftsmithError(
            "the mask must have the logits' shape without the vocabulary dimension",
            seen={"mask": tuple(mask.shape), "logits": tuple(logits[0].shape)},
            fix="Pass a [B, T] mask for [B, T, V] logits",
        )
    m = mask.reshape(-1).to(flat[0].device)
    if m.dtype == torch.bool:
        return tuple(t[m] for t in flat), None
    keep = m != 0
    return tuple(t[keep] for t in flat), m[keep].float()


def _mean(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(Weighted) mean of a per-position value [M]; 0 (still in the graph) when M = 0."""
    if per_row.numel() == 0:
        return per_row.sum()
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum()


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits / temperature."""
    if not temperature > 0:
        raise DraftsmithError(
            "the distillation temperature must be positive",
            seen=temperature,
            fix="Use 1.0 for the models' own distributions",
        )
    return logits.float() / temperature


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 log-softmax of logits / temperature."""
    return torch.log_softmax(_scaled(logits, temperature), dim=-1)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) per row = Σ_x a(x) (log a(x) − log b(x)); [M, V] log-probs → [M].

    Terms with a(x) = 0 count 0 (the 0·log 0 = 0 convention), so -inf logits in `a` are safe.
    """
    terms = log_a.exp() * (log_a - log_b)
    return torch.where(log_a == -math.inf, torch.zeros_like(terms), terms).sum(-1)


# --------------------------------------------------------------------------- divergences


def forward_kl(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL(p‖q) = E_{x~p}[log p(x) − log q(x)] = Σ_x p (log p − log q).

    The expectation is under the TARGET p: the drafter is pushed to cover every token the
    target gives mass to (mass-covering). This is standard KD and what DistillSpec calls FKL.
    """
    (t, d), w = _rows((target_logits.detach(), drafter_logits), mask)
    return _mean(_kl_rows(_log_probs(t, temperature), _log_probs(d, temperature)), w)


def reverse_kl(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Reverse KL(q‖p) = E_{x~q}[log q(x) − log p(x)] = Σ_x q (log q − log p).

    The expectation is under the DRAFTER q: the drafter is pushed onto the target's modes and
    punished for mass where p is small (mode-seeking). DistillSpec's RKL.
    """
    (t, d), w = _rows((target_logits.detach(), drafter_logits), mask)
    return _mean(_kl_rows(_log_probs(d, temperature), _log_probs(t, temperature)), w)


def jsd(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD(β) (Agarwal et al., GKD, 2306.13649).

    JSD(β) = β·KL(p‖m) + (1−β)·KL(q‖m) with the mixture m = β·p + (1−β)·q: the first term is
    an expectation under the target p, the second under the drafter q. β = 0.5 gives the
    symmetric JS divergence, bounded by log 2. The convention is TRL's (GKDTrainer).

    At β = 0 and β = 1 the formula is identically 0 (m equals q, resp. p), so the endpoints
    return its limits after rescaling, as GKD/TRL do: JSD(β)/β → KL(p‖q) (forward KL) as
    β → 0 and JSD(β)/(1−β) → KL(q‖p) (reverse KL) as β → 1. Mind the scale jump near them.
    """
    if not 0.0 <= beta <= 1.0:
        raise DraftsmithError("jsd's beta must lie in [0, 1]", seen=beta, fix="Use 0.5 for JS")
    if beta == 0.0:
        return forward_kl(target_logits, drafter_logits, mask, temperature)
    if beta == 1.0:
        return reverse_kl(target_logits, drafter_logits, mask, temperature)
    (t, d), w = _rows((target_logits.detach(), drafter_logits), mask)
    log_p, log_q = _log_probs(t, temperature), _log_probs(d, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return _mean(beta * _kl_rows(log_p, log_m) + (1 - beta) * _kl_rows(log_q, log_m), w)


def tvd(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Total variation distance TV(p, q) = ½ Σ_x |p(x) − q(x)| (symmetric, no expectation).

    1 − TV(p, q) = Σ_x min(p, q) is the per-token acceptance β of speculative sampling
    (METHODS.md), so minimising TVD maximises teacher-forced acceptance (DistillSpec's TVD).
    """
    (t, d), w = _rows((target_logits.detach(), drafter_logits), mask)
    p = _log_probs(t, temperature).exp()
    q = _log_probs(d, temperature).exp()
    return _mean(0.5 * (p - q).abs().sum(-1), w)


def topk_forward_kl(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    k: int = 10,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL restricted to the target's top-k tokens: Σ_{x∈K} p_K(x) (log p_K(x) − log q(x)).

    K is the set of the k most likely target tokens (k here counts vocabulary entries, not
    draft positions). The expectation is under p_K, the target distribution RENORMALISED over
    K (softmax of the top-k target logits). log q comes from the drafter's FULL softmax, not
    renormalised over K: the drafter is charged for mass it puts outside K, so the minimum 0
    is reached at q = p_K, and at q = p the value is −log p(K) > 0 unless p lives on K.
    With k ≥ V this is exactly `forward_kl`. Top-k distillation as in HASS (2408.15766) and
    GRIFFIN (2502.11018), whose defaults are k = 10; only [M, k] target values are kept.
    """
    if k < 1:
        raise DraftsmithError("topk_forward_kl needs k >= 1", seen=k, fix="Use e.g. k=10")
    (t, d), w = _rows((target_logits.detach(), drafter_logits), mask)
    top, index = _scaled(t, temperature).topk(min(k, t.shape[-1]), dim=-1)  # [M, k]
    log_p_k = torch.log_softmax(top, dim=-1)
    d = _scaled(d, temperature)
    log_q_k = d.gather(-1, index) - d.logsumexp(-1, keepdim=True)  # [M, k]
    return _mean(_kl_rows(log_p_k, log_q_k), w)


# --------------------------------------------------------------------------- cross-entropies


def target_argmax_ce(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy of q on the target's greedy token: −log q(argmax_x p(x)).

    A hard-label expectation under the point mass at argmax p; it trains for greedy (T = 0)
    acceptance, where a draft is accepted iff it equals argmax p. The argmax ignores the
    temperature; q is softmax(drafter_logits / temperature).
    """
    (t, d), w = _rows((target_logits.detach(), drafter_logits), mask)
    greedy = t.argmax(dim=-1)  # [M]
    return _mean(F.cross_entropy(_log_probs(d, temperature), greedy, reduction="none"), w)


def data_ce(
    drafter_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of q on the data's tokens: −log q(labels), no target involved.

    `labels` [...] holds, at each position, the token the drafter's logits there should
    predict (already shifted by the caller). Labels equal to -100 are skipped like masked
    positions.
    """
    if labels.shape != drafter_logits.shape[:-1]:
        raise DraftsmithError(
            "labels must have the logits' shape without the vocabulary dimension",
            seen={"labels": tuple(labels.shape), "logits": tuple(drafter_logits.shape)},
            fix="Pass [B, T] labels for [B, T, V] logits",
        )
    keep = labels != IGNORE_INDEX
    if mask is None:
        mask = keep
    elif mask.dtype == torch.bool:
        mask = mask & keep
    else:
        mask = mask * keep
    (d,), w = _rows((drafter_logits,), mask)
    (y,), _ = _rows((labels.unsqueeze(-1),), mask)
    return _mean(F.cross_entropy(d.float(), y.squeeze(-1), reduction="none"), w)


# --------------------------------------------------------------------------- acceptance


@torch.no_grad()
def acceptance_estimate(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Teacher-forced acceptance: mean over positions of β = Σ_x min(p(x), q(x)).

    β is the probability that speculative sampling accepts one draft token x ~ q at that
    position (Leviathan et al. 2211.17192); it equals 1 − TV(p, q). A metric, not a loss:
    computed without gradient (use 1 − `tvd` to train on it).
    """
    (t, d), w = _rows((target_logits, drafter_logits), mask)
    p = _log_probs(t, temperature).exp()
    q = _log_probs(d, temperature).exp()
    return _mean(torch.minimum(p, q).sum(-1), w)


def chain_tau(alpha: float, k: int) -> float:
    """Expected new tokens per step for a chain of k drafts with i.i.d. acceptance alpha.

    τ = (1 − α^(k+1)) / (1 − α) = Σ_{i=0}^{k} α^i, bonus/correction token included
    (Leviathan et al. 2211.17192); τ = k + 1 at α = 1. The sum form is exact at α = 1
    and accepts a tensor alpha too.
    """
    if int(k) != k or k < 0:
        raise DraftsmithError("the draft length k must be an integer >= 0", seen=k)
    return sum(alpha**i for i in range(int(k) + 1))


# --------------------------------------------------------------------------- registry

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "target_ce": target_argmax_ce,
    "data_ce": data_ce,
    "topk_forward_kl": topk_forward_kl,
}


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss function registered under `name` (a recipe's `loss:` value)."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise DraftsmithError(
            "unknown loss",
            seen=name,
            fix=f"Use one of: {', '.join(sorted(LOSSES))}",
        ) from None
