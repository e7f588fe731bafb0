"""Training of kind `parallel` (PARD, An et al. 2504.18583; PARD-2 2605.08632).

Drafting reads [x_0..x_n, m, .., m]: the mask at position n+d (d = 1..K-1, its depth) predicts
x_{n+d+1} from the committed x_0..x_n and the masks before it. Training builds every such situation
in one forward: each sequence x_0..x_{T-1} is followed by its mask blocks. The element (d, a) of
block d stands for the mask at depth d after the anchor a (the last committed token): input the
mask token, position id a+d (the position it takes when drafting), label x_{a+d+1}; it attends to
x_0..x_a and to the elements (1..d, a) — exactly what the mask sees when drafting. Depth 0 is the
sequence itself (position a predicts x_{a+1}).

An element (d, a) exists when positions a..a+d are all trained (x_{a+1}..x_{a+d+1} are assistant
tokens): drafting starts from the last committed token and only ever drafts the target's answer.

The blocks, their attention mask and conditional drop-token (COD) live in models/mask_blocks.py,
shared with P-EAGLE (models/peagle.py).

Loss: the recipe's objective (distill/objective.py, handed in by the trainer: a loss mix per row, p =
the target's distribution at the position the element predicts, given the data's prefix), a weighted
mean over all kept rows, each weighed by its depth's position weight. `reach` is PARD-2's CAT: the
element (d, a) weighs prod_{j=a}^{a+d-1} p(x_{j+1} | x_<=j), the target's chance to accept the gold
drafts before it; `accepted_length` uses the batch's mean α per depth. With `loss.name: data_ce` (and
no reach weights) no target runs during training (PARD's target-independent mode).
"""

from __future__ import annotations

import torch
from torch import nn

from draftsmith.errors import DraftsmithError
from draftsmith.models.target import data_token_probs
from draftsmith.models.mask_blocks import (MaskBlocks, block_attention, cod_fractions, cod_keep, depth_stats,
                                          gather_blocks, valid_anchors)
from draftsmith.models.parallel import freeze_embeddings_but_mask, mask_token_id, target_vocab_size


class ParallelTrainModule(nn.Module):
    """What the trainer wraps for kind `parallel`. Returns the depth-0 logits on the trained positions
    (the rows of the target's logits, for the held-out figures) and the whole loss (`owns_loss`)."""

    owns_loss = True
    target_layers = ()

    def __init__(self, model: nn.Module, objective, k: int, cod_ratio: float, cod_floor: float,
                 freeze_embeddings: bool = False):
        super().__init__()
        if k < 1:
            raise DraftsmithError("drafter.parallel_k must be >= 1", k)
        self.model = model
        self.objective, self.k = objective, k
        self.fractions = cod_fractions(k, cod_ratio, cod_floor)
        self.mask_id, self.vocab = mask_token_id(model), target_vocab_size(model)
        # PARD's target-independent mode: plain CE on the data, no target forward in training steps
        self.needs_target = objective.needs_target
        self.step_stats: dict[str, float] = {}
        self.train_stats: dict[str, float] = {}
        # frozen embeddings: the LM head reads a detached weight, so no [V, H] weight gradient is computed
        self.frozen_head = freeze_embeddings
        if freeze_embeddings:
            freeze_embeddings_but_mask(model)
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise DraftsmithError("Parallel training needs an attention that takes a 4-D mask", impl,
                                  "Load the drafter with attn_implementation='sdpa' or 'eager'")
        self._float_mask = impl == "eager"

    def _blocks(self, mask: torch.Tensor) -> MaskBlocks:
        valid = valid_anchors(mask, self.k)
        # held-out figures draw the same elements every evaluation
        g = None if self.training else torch.Generator(device=mask.device).manual_seed(0)
        blocks = gather_blocks(cod_keep(valid, self.fractions, g))
        if self.k == 1:
            shape = (mask.shape[0], 0)
            blocks = MaskBlocks(mask.new_zeros(shape, dtype=torch.long), mask.new_zeros(shape, dtype=torch.long),
                                mask.new_zeros(shape))
        return blocks

    def forward(self, input_ids, attention_mask, mask, target_hidden=None, t_logits=None):
        b, t = input_ids.shape
        blocks = self._blocks(mask)
        ids = torch.cat([input_ids, torch.full_like(blocks.anchor, self.mask_id)], dim=1)         # [B, T+M]
        positions = torch.cat([torch.arange(t, device=ids.device).expand(b, -1), blocks.anchor + blocks.depth], 1)
        attend = block_attention(attention_mask, blocks)
        if self._float_mask:
            attend = torch.zeros(attend.shape, device=ids.device).masked_fill(~attend, torch.finfo(torch.float32).min)
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=ids, attention_mask=attend, position_ids=positions).last_hidden_state  # [B, T+M, H]

        # rows: depth 0 on the trained positions, then every kept element; p_row = the position predicted from
        where = blocks.anchor + blocks.depth                                                    # [B, M]
        row_of = torch.cumsum(mask.flatten(), 0).view(mask.shape) - 1                            # [B, R] -> t row
        el_rows = row_of.gather(1, where.clamp(max=t - 2))[blocks.real]                           # [Ne]
        h = torch.cat([hidden[:, : t - 1][mask], hidden[:, t:][blocks.real]])
        logits = self._head(h)                                                                    # [N0 + Ne, V]
        labels0 = input_ids[:, 1:][mask]
        n0 = labels0.shape[0]
        labels = torch.cat([labels0, labels0[el_rows]])
        depth = torch.cat([blocks.depth.new_zeros(n0), blocks.depth[blocks.real]])              # [N0 + Ne]
        t_rows = None if t_logits is None else torch.cat([t_logits, t_logits[el_rows]])
        loss_rows, alpha = self.objective.rows(t_rows, logits, labels)
        weights = self._row_weights(blocks, depth, alpha, t_logits, labels0, mask).to(loss_rows.device)
        loss = (loss_rows * weights).sum() / weights.sum().clamp_min(1e-12)
        if labels.numel() == 0:   # no trained row: a zero that still reaches every weight (DDP's buckets)
            loss = loss + 0.0 * hidden.sum()
        if self.training:
            self.train_stats = self.objective.stats(alpha, depth, self.k)
        elif t_logits is not None:
            self._depth_stats(logits[n0:].detach(), t_logits[el_rows], blocks.depth[blocks.real],
                              logits[:n0].detach(), t_logits)
        return logits[:n0], loss

    def _row_weights(self, blocks: MaskBlocks, depth, alpha, t_logits, labels0, mask) -> torch.Tensor:
        """Each row's position weight (by its depth; reach: by its anchor too), [N0 + Ne]."""
        if alpha is not None and alpha.numel():
            alpha = torch.stack([alpha[depth == d].mean() if (depth == d).any() else alpha.new_zeros(())
                                 for d in range(self.k)])                                          # [K]
        gold = None
        if self.objective.position_weights == "reach" and t_logits is not None:
            gold = data_token_probs(t_logits, labels0, mask)                                       # [B, R]
        w = self.objective.along(self.k, alpha=alpha, gold=gold).to(depth.device)
        if w.dim() == 1:
            return w[depth]
        b = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(blocks.anchor)
        return torch.cat([w.new_ones(int(mask.sum())), w[blocks.depth, b, blocks.anchor][blocks.real]])

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head over the target's vocabulary only (the mask token is never drafted)."""
        head = self.model.get_output_embeddings()
        weight = head.weight[: self.vocab]
        bias = None if getattr(head, "bias", None) is None else head.bias[: self.vocab]
        if self.frozen_head:
            weight, bias = weight.detach(), None if bias is None else bias.detach()
        return torch.nn.functional.linear(h, weight, bias)

    @torch.no_grad()
    def _depth_stats(self, el_logits, el_t, el_depth, logits0, t0) -> None:
        """Greedy agreement with the target per depth, and the chain tau(k=K) they predict."""
        hit = torch.cat([logits0.argmax(-1) == t0.argmax(-1), el_logits.argmax(-1) == el_t.argmax(-1)])
        depth = torch.cat([el_depth.new_zeros(logits0.shape[0]), el_depth])
        self.step_stats = depth_stats(hit, depth, self.k)
