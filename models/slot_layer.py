"""A static KV-cache layer that writes new keys and values at the slots it is told, row by row.

transformers' StaticLayer writes a forward's new tokens at one shared running position. The compiled target's caches
(models/compiled_target.py for batch 1, models/static_rows.py for batched rows) choose each token's slot themselves:
a batched row writes at its own length, and a tree's off-chain nodes sit at slots that keep the attention's sums as
plain decoding's (compiled_target.py `tree_slots`). They set `write_at` [rows, width] before every forward; each layer
scatters its new keys and values there.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import StaticLayer


class SlotLayer(StaticLayer):
    """A static layer whose update writes row r's new token t at slot write_at[r, t]."""

    def __init__(self, max_cache_len: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__(max_cache_len=max_cache_len)
        self.write_at: torch.Tensor | None = None
        if keys is not None:
            self.set(keys, values)

    def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Adopt `keys` and `values` [rows, kv heads, slots, head dim] as this layer's tensors."""
        self.keys, self.values = keys, values
        self.device, self.batch_size, self.num_heads = keys.device, keys.shape[0], keys.shape[1]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.write_at is None:
            raise RuntimeError("SlotLayer.update before its cache set write_at")
        at = self.write_at[:, None, :, None]
        self.keys.scatter_(2, at.expand(-1, key_states.shape[1], -1, key_states.shape[-1]), key_states)
        self.values.scatter_(2, at.expand(-1, value_states.shape[1], -1, value_states.shape[-1]), value_states)
        return self.keys, self.values
