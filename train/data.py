"""Training batches: a deterministic order indexed by the global micro-step, so a resumed run reads
exactly the batches an uninterrupted one would, and each rank reads its own slice."""

from __future__ import annotations

import torch

from draftsmith.distill.teacher import collate_signals
from draftsmith.errors import DraftsmithError


class BatchSchedule:
    """Micro-batch m on rank r holds items [m·B·W + r·B, m·B·W + (r+1)·B) of the concatenated
    per-epoch permutations (epoch e shuffled with seed + e)."""

    def __init__(self, num_items: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if num_items < batch_size * world_size:
            raise DraftsmithError(f"Too few training sequences for one global batch of {batch_size * world_size}",
                                  num_items, "Use more data or a smaller train.batch_size")
        self.n, self.b, self.w, self.r, self.seed = num_items, batch_size, world_size, rank, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, micro_step: int) -> list[int]:
        start = micro_step * self.b * self.w + self.r * self.b
        out = []
        for pos in range(start, start + self.b):
            epoch, offset = divmod(pos, self.n)
            out.append(self._perm(epoch)[offset])
        return out

    def epoch_of(self, micro_step: int) -> float:
        return micro_step * self.b * self.w / self.n


def collate(rows: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. loss_mask marks the tokens whose prediction is trained."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        attention[i, :n] = 1
        mask[i, :n] = torch.as_tensor(r["loss_mask"], dtype=torch.bool)
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": mask}
    if "teacher" in rows[0]:      # rows of an offline teacher cache (data.teacher: cache:DIR)
        batch["teacher"] = collate_signals([r["teacher"] for r in rows], mask)
    return batch
