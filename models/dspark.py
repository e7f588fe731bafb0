"""Kind `dspark` (DSpark, 2607.05147): the DFlash backbone (models/block_drafter.py) drafting from the
anchor slot too (B drafts per forward, speculators' `sample_from_anchor` true), plus

- a Markov head: a low-rank logit bias W2(W1[x]) for each draft from the token x before it (the anchor
  for the first draft, then the drafted token), so a block's drafts are no longer independent given
  the context; serial but tiny (one [r] -> [Vd] product per draft);
- a confidence head: a linear map of [the draft's normed hidden state ; W1[x]] to the logit of the draft's
  acceptance, trained with BCE against α = Σ min(p, q) (BlockTrainModule); `--k auto` uses it instead
  of its online calibration.

Tensor names and shapes are speculators' `dspark` type (markov_head.markov_w1 / markov_w2,
confidence_head.proj; its `vanilla` Markov head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from draftsmith.errors import DraftsmithError
from draftsmith.models.block_drafter import BlockConfig, BlockHead


@dataclass
class DSparkConfig(BlockConfig):
    sample_from_anchor: bool = True
    markov_rank: int = 256                 # 0: no Markov head
    confidence_head: bool = True
    confidence_with_markov: bool = True    # the confidence head also reads W1[previous token]
    draftsmith_kind: str = "dspark"


class MarkovHead(nn.Module):
    def __init__(self, vocab_size: int, draft_vocab_size: int, rank: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        nn.init.normal_(self.markov_w1.weight, std=0.01)          # speculators' init
        self.markov_w2 = nn.Linear(rank, draft_vocab_size, bias=False)


class ConfidenceHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, 1)


class DSparkHead(BlockHead):
    config_class = DSparkConfig

    def __init__(self, config: DSparkConfig):
        super().__init__(config)
        if config.markov_rank < 0 or (config.confidence_with_markov and config.confidence_head
                                      and config.markov_rank == 0):
            raise DraftsmithError("A dspark confidence head that reads the Markov embedding needs markov_rank > 0",
                                  config.markov_rank, "Set markov_rank > 0, or confidence_with_markov false")
        self.markov_head = (MarkovHead(config.vocab_size, config.draft_vocab_size, config.markov_rank)
                            if config.markov_rank else None)
        width = config.hidden_size + (config.markov_rank if config.confidence_with_markov else 0)
        self.confidence_head = ConfidenceHead(width) if config.confidence_head else None

    def bias(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.markov_head is None:
            return None
        m = self.markov_head
        return m.markov_w2(m.markov_w1(prev_ids).to(m.markov_w2.weight.dtype))

    @property
    def predicts_acceptance(self) -> bool:
        return self.confidence_head is not None

    def confidence(self, prev_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor | None:
        if self.confidence_head is None:
            return None
        features = self.norm(hidden)      # speculators: the slot's hidden state after the final norm
        if self.config.confidence_with_markov:
            features = torch.cat([features, self.markov_head.markov_w1(prev_ids).to(features.dtype)], dim=-1)
        return self.confidence_head.proj(features)[..., 0]
