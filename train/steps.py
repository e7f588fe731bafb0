"""One distillation forward: the frozen target's logits (online teacher signal) against the
drafter's, on the positions whose next token is an assistant token."""

from __future__ import annotations

import torch

from draftsmith.distill import losses


def target_logits(target_model: torch.nn.Module, input_ids, attention_mask, pred_mask) -> torch.Tensor:
    """[N, V] target logits at the N trained positions; the LM head runs on those rows only."""
    with torch.no_grad():
        base = getattr(target_model, target_model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        return target_model.get_output_embeddings()(hidden[:, :-1][pred_mask])


class MaskedHead(torch.nn.Module):
    """The drafter as the trainer wraps it (DDP/FSDP/DeepSpeed wrap this module): its LM head runs
    only on the trained positions, which saves the head's cost on prompts and padding."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, pred_mask) -> torch.Tensor:
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        return self.model.get_output_embeddings()(hidden[:, :-1][pred_mask])                # [N, V]


def distill_loss(loss_cfg, t_logits: torch.Tensor, d_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The recipe's loss between target p and drafter q, plus an optional CE on the data's tokens."""
    fn = losses.get_loss(loss_cfg.name)
    if loss_cfg.name == "data_ce":
        loss = fn(d_logits, labels)
    else:
        extra = {"beta": loss_cfg.beta} if loss_cfg.name == "jsd" else {}
        if loss_cfg.name == "topk_forward_kl":
            extra = {"k": loss_cfg.top_k}
        if loss_cfg.name != "target_ce":
            extra["temperature"] = loss_cfg.temperature
        loss = fn(t_logits, d_logits, **extra)
    if loss_cfg.data_ce_weight:
        loss = loss + loss_cfg.data_ce_weight * losses.data_ce(d_logits, labels)
    return loss


def forward_batch(target_model, drafter, batch: dict, loss_cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, target logits [N, V], drafter logits [N, V]) for one batch."""
    ids, attention = batch["input_ids"], batch["attention_mask"]
    pred_mask = batch["loss_mask"][:, 1:] & attention[:, :-1].bool()   # predict token t+1 at position t
    t_logits = target_logits(target_model, ids, attention, pred_mask)
    d_logits = drafter(ids, attention, pred_mask)   # [N, V]; drafter is a (wrapped) MaskedHead
    labels = ids[:, 1:][pred_mask]
    return distill_loss(loss_cfg, t_logits, d_logits, labels), t_logits, d_logits


@torch.no_grad()
def heldout_metrics(target_model, drafter, batches: list[dict], loss_cfg, k_max: int) -> dict:
    """Held-out loss and teacher-forced acceptance: α = mean Σ_x min(p, q) (sampling at T=1) and
    the argmax agreement rate (greedy), with the chain τ = (1 − α^(k+1)) / (1 − α) they predict."""
    total, accept, greedy, rows = 0.0, 0.0, 0.0, 0
    for batch in batches:
        loss, t_logits, d_logits = forward_batch(target_model, drafter, batch, loss_cfg)
        n = t_logits.shape[0]
        if n == 0:
            continue
        total += float(loss) * n
        accept += float(losses.acceptance_estimate(t_logits, d_logits)) * n
        greedy += float((t_logits.argmax(-1) == d_logits.argmax(-1)).float().mean()) * n
        rows += n
    if rows == 0:
        return {}
    alpha, alpha_greedy = accept / rows, greedy / rows
    out = {"heldout_loss": total / rows, "acceptance_estimate": alpha, "greedy_match": alpha_greedy}
    for k in range(1, k_max + 1):
        out[f"tau_k{k}"] = losses.chain_tau(alpha, k)
        out[f"tau_greedy_k{k}"] = losses.chain_tau(alpha_greedy, k)
    return out
