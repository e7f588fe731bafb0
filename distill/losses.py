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
temperature=1.0)`; `data_ce` alone takes `(drafter_logits, labels, mask=None)`. Each is the mean of a
per-row kernel `fn_rows(Rows) -> [M]`; LOSSES registers both as one `Loss` per name, and the kernels are what a
weighted mix of losses and per-position weights combines (distill/objective.py).

The acceptance objectives (the LK losses, arXiv 2602.23881) train for α = Σ_x min(p, q) itself:
`tvd` = 1 − α, `nla` = −log α, `lk_hybrid` = λ·KL(p‖q) + (1 − λ)·(1 − α) with λ = exp(−3α), α detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from draftsmith.errors import DraftsmithError
from draftsmith.metric_modules.acceptance.acceptance_figures import tau_from_alphas

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


# --------------------------------------------------------------------------- per-row values


class Rows:
    """The kept rows of one comparison, [M, V] each, with the softmaxes computed once and shared by
    every loss of a mix (distill/objective.py). `t` is None for a loss on the data alone."""

    def __init__(self, t: torch.Tensor | None, d: torch.Tensor, labels: torch.Tensor | None = None,
                 temperature: float = 1.0):
        self.t = None if t is None else t.detach()
        self.d, self.labels, self.temperature = d, labels, temperature
        self._cache: dict[str, torch.Tensor] = {}

    def _get(self, key: str, make) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def log_p(self) -> torch.Tensor:
        if self.t is None:
            raise DraftsmithError("this loss compares with the target's distribution, and none is given",
                                  fix="Train with the target in the loop (data.teacher online or a cache), "
                                      "or use loss.name=data_ce")
        return self._get("log_p", lambda: _log_probs(self.t, self.temperature))

    @property
    def log_q(self) -> torch.Tensor:
        return self._get("log_q", lambda: _log_probs(self.d, self.temperature))

    @property
    def alpha(self) -> torch.Tensor:
        """β = Σ_x min(p(x), q(x)) per row [M]: the acceptance of exact speculative sampling there
        (Leviathan et al. 2211.17192), with its gradient through q."""
        return self._get("alpha", lambda: torch.minimum(self.log_p.exp(), self.log_q.exp()).sum(-1))

    def alpha_value(self) -> torch.Tensor:
        """α per row without a gradient: the one a loss term built, else computed without a graph (a
        KL-only mix never keeps two [M, V] probability tensors alive for it)."""
        if "alpha" in self._cache:
            return self._cache["alpha"].detach()
        with torch.no_grad():
            return torch.minimum(self.log_p.exp(), self.log_q.exp()).sum(-1)


def forward_kl_rows(r: Rows) -> torch.Tensor:
    return _kl_rows(r.log_p, r.log_q)


def reverse_kl_rows(r: Rows) -> torch.Tensor:
    return _kl_rows(r.log_q, r.log_p)


def jsd_rows(r: Rows, beta: float = 0.5) -> torch.Tensor:
    if not 0.0 <= beta <= 1.0:
        raise DraftsmithError("jsd's beta must lie in [0, 1]", seen=beta, fix="Use 0.5 for JS")
    if beta == 0.0:
        return forward_kl_rows(r)
    if beta == 1.0:
        return reverse_kl_rows(r)
    log_m = torch.logaddexp(r.log_p + math.log(beta), r.log_q + math.log1p(-beta))
    return beta * _kl_rows(r.log_p, log_m) + (1 - beta) * _kl_rows(r.log_q, log_m)


def tvd_rows(r: Rows) -> torch.Tensor:
    return 0.5 * (r.log_p.exp() - r.log_q.exp()).abs().sum(-1)


NLA_FLOOR = 1e-6
"""nla's α is floored here: −log 0 would be inf (a drafter with no overlap at all)."""


def nla_rows(r: Rows) -> torch.Tensor:
    return -r.alpha.clamp_min(NLA_FLOOR).log()


def lk_hybrid_rows(r: Rows) -> torch.Tensor:
    lam = torch.exp(-3.0 * r.alpha.detach())
    return lam * forward_kl_rows(r) + (1 - lam) * (1 - r.alpha)


def topk_forward_kl_rows(r: Rows, k: int = 10) -> torch.Tensor:
    if k < 1:
        raise DraftsmithError("topk_forward_kl needs k >= 1", seen=k, fix="Use e.g. k=10")
    top, index = _scaled(r.t, r.temperature).topk(min(k, r.t.shape[-1]), dim=-1)  # [M, k]
    return _kl_rows(torch.log_softmax(top, dim=-1), r.log_q.gather(-1, index))


def target_ce_rows(r: Rows) -> torch.Tensor:
    return F.cross_entropy(r.log_q, r.t.argmax(dim=-1), reduction="none")


def data_ce_rows(r: Rows) -> torch.Tensor:
    """−log q(label) at temperature 1; rows labelled IGNORE_INDEX count 0 (callers mask them)."""
    return F.cross_entropy(r.d.float(), r.labels, reduction="none", ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------- divergences


def _divergence(kernel, target_logits, drafter_logits, mask, temperature, **options) -> torch.Tensor:
    (t, d), w = _rows((target_logits.detach(), drafter_logits), mask)
    return _mean(kernel(Rows(t, d, temperature=temperature), **options), w)


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
    return _divergence(forward_kl_rows, target_logits, drafter_logits, mask, temperature)


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
    return _divergence(reverse_kl_rows, target_logits, drafter_logits, mask, temperature)


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
    return _divergence(jsd_rows, target_logits, drafter_logits, mask, temperature, beta=beta)


def tvd(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Total variation distance TV(p, q) = ½ Σ_x |p(x) − q(x)| (symmetric, no expectation).

    1 − TV(p, q) = Σ_x min(p, q) is the per-token acceptance β of speculative sampling
    (METHODS.md), so minimising TVD maximises teacher-forced acceptance (DistillSpec's TVD;
    the LK losses' and speculators' `tv`).
    """
    return _divergence(tvd_rows, target_logits, drafter_logits, mask, temperature)


def nla(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Negative log-acceptance −log α, α = Σ_x min(p(x), q(x)) (LK losses, 2602.23881).

    The same optimum as TV (α = 1 at q = p) with the gradient −∇α / α: rows the drafter barely
    accepts pull hardest, so it trains from a cold start where TV's gradient is flat. α is
    floored at NLA_FLOOR. Symmetric in p and q; the gradient reaches q only.
    """
    return _divergence(nla_rows, target_logits, drafter_logits, mask, temperature)


def lk_hybrid(
    target_logits: torch.Tensor,
    drafter_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """LK hybrid λ·KL(p‖q) + (1 − λ)·TV(p, q) with λ = exp(−3·α), α = Σ_x min(p, q) DETACHED
    (LK losses, 2602.23881; speculators' lk_hybrid): forward KL (an expectation under the
    target p) while the drafter is far from the target, TV = 1 − α once it is close.
    """
    return _divergence(lk_hybrid_rows, target_logits, drafter_logits, mask, temperature)


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
    return _divergence(topk_forward_kl_rows, target_logits, drafter_logits, mask, temperature, k=k)


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
    temperature; q is softmax(drafter_logits / temperature). Named `ce` in a loss mix
    (speculators' and DSpark's CE term), `target_ce` as a loss of its own.
    """
    return _divergence(target_ce_rows, target_logits, drafter_logits, mask, temperature)


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
    return _mean(data_ce_rows(Rows(None, d, y.squeeze(-1))), w)


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
    return _mean(Rows(t, d, temperature=temperature).alpha, w)


def chain_tau(alpha: float, k: int) -> float:
    """Expected new tokens per step for a chain of k drafts with i.i.d. acceptance alpha.

    τ = (1 − α^(k+1)) / (1 − α) = Σ_{i=0}^{k} α^i, bonus/correction token included
    (Leviathan et al. 2211.17192); τ = k + 1 at α = 1: `tau_from_alphas` (the eval report's
    acceptance figures) with α at every position. Accepts a tensor alpha too.
    """
    if int(k) != k or k < 0:
        raise DraftsmithError("the draft length k must be an integer >= 0", seen=k)
    return tau_from_alphas([alpha] * int(k))


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Loss:
    """One loss under its recipe name: `mean` over [..., V] logits (`fn(target_logits, drafter_logits, mask=None,
    temperature=1.0)`; data_ce: `fn(drafter_logits, labels, mask=None)`) and `rows`, its per-row kernel
    `fn(Rows, **options) -> [M]` that a mix of losses and position weights combines (distill/objective.py)."""

    mean: Callable[..., torch.Tensor]
    rows: Callable[..., torch.Tensor]


LOSSES: dict[str, Loss] = {
    "forward_kl": Loss(forward_kl, forward_kl_rows),
    "reverse_kl": Loss(reverse_kl, reverse_kl_rows),
    "jsd": Loss(jsd, jsd_rows),
    "tvd": Loss(tvd, tvd_rows),
    "nla": Loss(nla, nla_rows),
    "lk_hybrid": Loss(lk_hybrid, lk_hybrid_rows),
    "target_ce": Loss(target_argmax_ce, target_ce_rows),
    "ce": Loss(target_argmax_ce, target_ce_rows),
    "data_ce": Loss(data_ce, data_ce_rows),
    "topk_forward_kl": Loss(topk_forward_kl, topk_forward_kl_rows),
}
"""Every loss by its recipe name (`loss.name`, the keys of `loss.mix`). `ce` is target_ce under the name
speculators and DSpark give their CE term."""


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss function registered under `name` (a recipe's `loss:` value)."""
    try:
        return LOSSES[name].mean
    except (KeyError, TypeError):
        raise DraftsmithError(
            "unknown loss",
            seen=name,
            fix=f"Use one of: {', '.join(sorted(LOSSES))}",
        ) from None
