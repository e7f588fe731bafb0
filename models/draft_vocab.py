"""A head's reduced draft vocabulary: the d2t / t2d maps of EAGLE-3, shared by every head kind that
scores only the most frequent tokens (eagle3, P-EAGLE, dflash, dspark).

  d2t [Vd] int64: target id of draft id i = i + d2t[i]   (EAGLE-3 / SGLang / speculators convention)
  t2d [V] bool:   target id j is in the draft vocabulary

Both are buffers of the head, saved with every checkpoint; a folder without them is refused.
"""

from __future__ import annotations

import torch

from draftsmith.errors import DraftsmithError


class DraftVocab:
    """Mixin for an nn.Module head with `config.vocab_size` and `config.draft_vocab_size`."""

    optional_tensors = ("d2t", "t2d")   # from_state refuses a folder without them, saying why

    def _init_vocab(self) -> None:
        self.register_buffer("d2t", torch.zeros(self.config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(self.config.vocab_size, dtype=torch.bool))

    def set_vocab(self, draft_ids: torch.Tensor) -> None:
        """draft_ids: [Vd] ascending target ids of the draft vocabulary."""
        ids = draft_ids.to(self.d2t.device, torch.long)
        self.d2t.copy_(ids - torch.arange(len(ids), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_ids(self) -> torch.Tensor:
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    def to_target_logits(self, draft: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., Vd] -> target-vocabulary logits [..., V], -inf outside the draft vocabulary."""
        full = draft.new_full((*draft.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., self.draft_ids] = draft
        return full

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids -> draft ids, -100 (a skipped label) outside the draft vocabulary; ids >= V count as outside."""
        index = torch.full((self.config.vocab_size + 1,), -100, dtype=torch.long, device=self.d2t.device)
        index[self.draft_ids] = torch.arange(len(self.d2t), device=self.d2t.device)
        return index[target_ids.clamp(0, self.config.vocab_size)]

    @classmethod
    def from_state(cls, config, state: dict, where: str):
        missing = [k for k in ("d2t", "t2d") if k not in state]
        if missing:
            raise DraftsmithError(f"This {config.draftsmith_kind} checkpoint has no draft-vocabulary maps",
                                  f"{where}: missing {missing}",
                                  "A head cannot map its draft tokens to the target's without d2t and t2d; "
                                  "re-export it with draftsmith export, or add the maps it was trained with")
        head = super().from_state(config, state, where)
        ids = head.draft_ids
        if int(head.t2d.sum()) != len(ids) or not bool(head.t2d[ids.clamp(0, len(head.t2d) - 1)].all()):
            raise DraftsmithError("The checkpoint's d2t and t2d maps disagree", where,
                                  "t2d must be True exactly at the target ids i + d2t[i]; re-export the drafter")
        return head


def draft_vocab_from_counts(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent target ids (ties: lower id first), ascending: the draft vocabulary."""
    if not 0 < size <= len(counts):
        raise DraftsmithError("drafter.draft_vocab_size must be between 1 and the target's vocabulary size",
                              size, f"Pick a value <= {len(counts)}")
    order = torch.sort(counts.double() - torch.arange(len(counts)) * 1e-9, descending=True, stable=True).indices
    return order[:size].sort().values
