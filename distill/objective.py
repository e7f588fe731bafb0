"""The training objective every drafter kind shares: a weighted mix of named losses per row, and
weights along the draft.

A mix (`loss.mix: {ce: 0.1, tvd: 0.9}`, DSpark 2607.05147; or `loss.name` alone, weight 1) is summed
per kept row from the kernels of distill/losses.py (LOSSES[name].rows), which share one softmax of p and q.
Every row also yields its acceptance α = Σ_x min(p, q), detached: the training log's α per position,
and the `accepted_length` weights below.

Positions run along the draft: training-time-test steps (eagle3), mask depths (parallel, P-EAGLE),
block positions. `loss.position_weights` weighs position i (0 = the first drafted token):
- uniform: 1.
- exp_decay: exp(−i/γ) (DSpark's block weights; EAGLE-3's 0.8^i is γ = 4.48).
- reach: Π_{j<i} p(x_j), the target's probability of the gold tokens before it — its chance to be
  reached (PARD-2's CAT, 2605.08632).
- accepted_length: ∂τ/∂α_i with τ = 1 + Σ_i Π_{j≤i} α_j and every α detached, i.e.
  Π_{j<i} α_j · (1 + Σ_{m>i} Π_{i<j≤m} α_j): Σ_i w_i·∇α_i = ∇τ, so with the tvd loss (1 − α_i) the
  weighted sum is exactly the gradient of −τ. The issue's "product of the α before it" is its first
  term; the rest counts that a position's acceptance also opens every later one.
- null: the kind's own default (eagle3's ttt_decay^i, uniform elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from draftsmith.distill import losses
from draftsmith.errors import DraftsmithError
from draftsmith.metric_modules.acceptance.acceptance_figures import tau_from_alphas

POSITION_WEIGHTS = ("uniform", "exp_decay", "reach", "accepted_length")
CHUNK_ELEMENTS = 1 << 20
"""Logits per slice of `Objective.rows` (4 MB in float32): 128 rows of an 8192-token draft vocabulary."""


@dataclass(frozen=True)
class Objective:
    """What a kind's training module computes per row and per position; built from the recipe's
    `loss` section by `from_config`."""

    mix: tuple[tuple[str, float], ...] = (("forward_kl", 1.0),)
    temperature: float = 1.0
    beta: float = 0.5
    top_k: int = 10
    position_weights: str | None = None
    gamma: float = 4.0

    @classmethod
    def from_config(cls, loss_cfg) -> "Objective":
        """`loss.mix` (or `loss.name` at weight 1) plus `loss.data_ce_weight` x data_ce."""
        mix = dict(loss_cfg.mix) if loss_cfg.mix else {loss_cfg.name: 1.0}
        if loss_cfg.data_ce_weight:
            mix["data_ce"] = mix.get("data_ce", 0.0) + loss_cfg.data_ce_weight
        return cls(tuple((name, float(w)) for name, w in mix.items() if w), loss_cfg.temperature,
                   loss_cfg.beta, loss_cfg.top_k, loss_cfg.position_weights, loss_cfg.gamma)

    @property
    def needs_target(self) -> bool:
        """False when every term reads the data alone (PARD's target-independent mode)."""
        return any(name != "data_ce" for name, _ in self.mix) or self.position_weights == "reach"

    def rows(self, t_logits: torch.Tensor | None, d_logits: torch.Tensor,
             labels: torch.Tensor | None = None, keep: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss [M], α [M] detached or None without a target) for M kept rows: logits [M, V], labels [M]
        (the data's token each row predicts; data_ce adds 0 on a row labelled -100). `keep`: a bool mask
        over t_logits' leading dims that picks its M rows here (a tensor the caller holds anyway is then
        not copied for the backward). d_logits may be bf16: every kernel starts with a float32 copy.

        The rows run in slices of about CHUNK_ELEMENTS logits (128 rows of an 8192-token vocabulary), and
        with a graph to build each slice's kernel internals (softmaxes, logs, minima) are not kept for the
        backward pass but recomputed there from its inputs (activation checkpointing). An unrolled head
        holds one loss graph per draft position at once: whole-row internals were most of its peak memory,
        and their batch-dependent sizes fragmented the CPU heap step after step, where one slice size
        recurs (bench/results/cpu-train-memory). Same values and gradients."""
        grad = torch.is_grad_enabled() and d_logits.requires_grad
        m, width = d_logits.shape[0], max(1, d_logits.shape[-1])
        step = max(1, CHUNK_ELEMENTS // width)
        where = None if keep is None or t_logits is None else keep.nonzero(as_tuple=True)
        # split, not sliced: a slice's backward writes its gradient into a zeroed copy of the whole of
        # d_logits, once per slice (at PARD's 2,560 x 49,152 logits, 20 GB of memory traffic a step);
        # split's backward concatenates the slices' gradients once
        d_parts = d_logits.split(step) if m else (d_logits,)
        losses_, alphas = [], []
        for i, start in enumerate(range(0, max(m, 1), step)):
            part = slice(start, start + step)
            if t_logits is None:
                t = None
            elif where is None:
                t = t_logits[part]
            else:
                t = t_logits        # gathered inside the slice, so no gathered copy waits for the backward
            args = (t, d_parts[i], None if labels is None else labels[part],
                    None if where is None else tuple(w[part] for w in where))
            loss, alpha = (checkpoint(self._slice, *args, use_reentrant=False) if grad else self._slice(*args))
            losses_.append(loss)
            alphas.append(alpha)
        if len(losses_) == 1:
            return losses_[0], alphas[0]
        return torch.cat(losses_), (None if alphas[0] is None else torch.cat(alphas))

    def _slice(self, t_logits, d_logits, labels, where):
        if where is not None:
            t_logits = t_logits[where]
        return self._rows(t_logits, d_logits, labels)

    def _rows(self, t_logits, d_logits, labels):
        r = losses.Rows(t_logits, d_logits, labels, self.temperature)
        total = d_logits.new_zeros(d_logits.shape[0], dtype=torch.float32)
        for name, weight in self.mix:
            options = {"jsd": {"beta": self.beta}, "topk_forward_kl": {"k": self.top_k}}.get(name, {})
            total = total + weight * losses.LOSSES[name].rows(r, **options)
        return total, (None if t_logits is None else r.alpha_value())

    def along(self, count: int, default: torch.Tensor | None = None, *, alpha: torch.Tensor | None = None,
              gold: torch.Tensor | None = None) -> torch.Tensor:
        """Weights of `count` draft positions, [count] or [count, *row shape]. `default`: the kind's own
        weights [count] (null position_weights); `alpha` [count, ...]: detached acceptance per position
        (accepted_length); `gold` [B, R]: the target's probability of the data's token at each row, row
        a + i standing for position i of the draft that starts at a (reach)."""
        name = self.position_weights
        if name is None:
            return default if default is not None else torch.ones(count)
        if name == "uniform":
            return torch.ones(count)
        if name == "exp_decay":
            return torch.exp(-torch.arange(count, dtype=torch.float32) / self.gamma)
        if name == "reach":
            if gold is None:
                raise DraftsmithError("reach weights need the target's probability of the data's tokens",
                                      fix="Train with the target in the loop (data.teacher online or a full cache)")
            return reach_weights(gold, count)
        if alpha is None:
            raise DraftsmithError("accepted_length weights need the target in the loop", name,
                                  "Use loss.position_weights=uniform or exp_decay for a data-only loss")
        return accepted_length_weights(alpha)

    @staticmethod
    def stats(alpha: torch.Tensor | None, position: torch.Tensor, count: int) -> dict[str, float]:
        """The training log's figures: mean α per position (`alpha_pos{i}`, i from 0) over the rows with
        α [M] at `position` [M], and the τ they imply; {} without a target."""
        if alpha is None or alpha.numel() == 0:
            return {}
        out, means = {}, []
        for i in range(count):
            at = alpha[position == i]
            if at.numel() == 0:
                break
            means.append(float(at.float().mean()))
            out[f"alpha_pos{i}"] = means[-1]
        out["tau_implied"] = tau_from_alphas(means)
        return out

    def describe(self) -> str:
        mix = " + ".join(f"{w:g}*{name}" for name, w in self.mix)
        return f"{mix}, position weights {self.position_weights or 'the kind default'}"


def reach_weights(gold: torch.Tensor, count: int) -> torch.Tensor:
    """w[i, b, a] = Π_{j<i} gold[b, a + j] (w[0] = 1, 0 past the row's end): PARD-2's CAT, the target's
    chance to accept the i gold tokens drafted after anchor a. gold: [B, R] -> [count, B, R]."""
    gold = gold.float()
    r = gold.shape[1]
    weights = [torch.ones_like(gold)]
    for i in range(1, count):
        w = torch.zeros_like(gold)
        w[:, : max(0, r - i)] = weights[-1][:, : max(0, r - i)] * gold[:, i - 1: r - 1]
        weights.append(w)
    return torch.stack(weights)


def accepted_length_weights(alpha: torch.Tensor) -> torch.Tensor:
    """∂τ/∂α_i for τ = 1 + Σ_i Π_{j≤i} α_j, per position along dim 0: [P, ...] -> [P, ...] (module doc)."""
    alpha = alpha.detach().float()
    before = torch.cumprod(torch.cat([torch.ones_like(alpha[:1]), alpha[:-1]]), dim=0)   # Π_{j<i} α_j
    after = [torch.ones_like(alpha[0])]                                                  # 1 + Σ_{m>i} Π_{i<j≤m}
    for i in range(alpha.shape[0] - 2, -1, -1):
        after.append(1 + alpha[i + 1] * after[-1])
    return before * torch.stack(after[::-1])
