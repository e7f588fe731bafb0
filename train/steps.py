"""One distillation forward: the frozen target's logits (online teacher signal) against the
drafter's, on the positions whose next token is an assistant token."""

from __future__ import annotations

import torch

from draftsmith.distill import losses
from draftsmith.distill.objective import Objective
from draftsmith.models.target import target_signals


def forward_batch(target_model, drafter, batch: dict, objective: Objective
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, target logits [N, V], drafter logits [N, V]) for one batch. `drafter` is the (wrapped)
    training module of its kind (models/<kind>.py). It declares the target layers it reads
    (`target_layers`), returns its logits on the same N positions and a loss term of its own
    (EAGLE's feature regression), which is the whole loss when it `owns_loss` (EAGLE-3's unrolled,
    vocabulary-restricted objective). A kind that owns its loss leaves its α per draft position in
    `train_stats`; for the others this sets it (one position)."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    # position j is trained when token j+1 is an assistant token
    mask = batch["loss_mask"][:, 1:] & attention[:, 1:].bool()          # [B, T-1]
    module = getattr(drafter, "module", drafter)
    layers = tuple(getattr(module, "target_layers", ()))
    if layers:
        mask[:, 0] = False        # a feature head's first row predicts position 1's token
    if torch.is_grad_enabled() and not getattr(module, "needs_target", True):
        t_logits, hidden = None, []     # a target-independent training step (held-out figures still run it)
    elif "teacher" in batch:     # an offline teacher cache (distill/teacher.py): the target does not run
        t_logits, hidden = batch["teacher"].signals(mask, layers)
    else:
        t_logits, hidden = target_signals(target_model, ids, attention, mask, layers)
    d_logits, aux = drafter(ids, attention, mask, hidden, t_logits)
    if getattr(module, "owns_loss", False):
        return aux, t_logits, d_logits
    labels = ids[:, 1:][mask]
    loss, alpha = objective.rows(t_logits, d_logits, labels)
    module.train_stats = objective.stats(alpha, torch.zeros_like(labels), 1)
    return (loss.mean() if loss.numel() else 0.0 * d_logits.sum()) + aux, t_logits, d_logits


HELDOUT_CHUNK = 128
"""Rows per slice of the held-out acceptance estimate (a SmolLM2 [128, V] fp32 slice is 25 MB)."""


@torch.no_grad()
def heldout_metrics(target_model, drafter, batches: list[dict], objective: Objective, k_max: int) -> dict:
    """Held-out loss and teacher-forced acceptance: α = mean Σ_x min(p, q) (sampling at T=1) and
    the argmax agreement rate (greedy), with the chain τ = (1 − α^(k+1)) / (1 − α) they predict."""
    total, accept, greedy, rows = 0.0, 0.0, 0.0, 0
    module = getattr(drafter, "module", drafter)
    extra: dict[str, list[float]] = {}
    for batch in batches:
        loss, t_logits, d_logits = forward_batch(target_model, drafter, batch, objective)
        n = t_logits.shape[0]
        if n == 0:
            continue
        for key, value in getattr(module, "step_stats", {}).items():   # per-step figures of unrolled heads
            extra.setdefault(key, []).append(value)
        total += float(loss) * n
        for i in range(0, n, HELDOUT_CHUNK):   # [N, V] softmaxes in slices: the peak stays a slice's
            t, d = t_logits[i:i + HELDOUT_CHUNK], d_logits[i:i + HELDOUT_CHUNK]
            accept += float(losses.acceptance_estimate(t, d)) * t.shape[0]
        greedy += float((t_logits.argmax(-1) == d_logits.argmax(-1)).float().sum())
        rows += n
    if rows == 0:
        return {}
    alpha, alpha_greedy = accept / rows, greedy / rows
    out = {"heldout_loss": total / rows, "acceptance_estimate": alpha, "greedy_match": alpha_greedy}
    out.update({key: sum(v) / len(v) for key, v in extra.items()})
    for k in range(1, k_max + 1):
        out[f"tau_k{k}"] = losses.chain_tau(alpha, k)
        out[f"tau_greedy_k{k}"] = losses.chain_tau(alpha_greedy, k)
    return out
