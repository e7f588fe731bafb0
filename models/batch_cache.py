"""A target KV cache shared by several sequences that decode together, each at its own length (ragged).

One transformers DynamicCache holds every row: per layer, keys and values [rows, kv heads, slots, head dim].
Row r's committed tokens are its first `lengths[r]` slots, with no holes; the slots past them are padding
that no query attends. A verify step over rows of different widths:

  1. appends W slots to every row (W: the widest row's root + draft nodes; narrower rows are padded with a
     token nobody attends), at physical slots [S, S + W) where S is the physical length;
  2. each row's queries attend its own `lengths[r]` committed slots and, among the new slots, their own
     ancestors in the row's draft (a chain: the slots before; a tree: protocol/tree.py's ancestor mask);
     positions are the row's own (lengths[r] + depth), so a row decodes exactly as it would alone;
  3. `keep` moves each row's kept slots (the root and the accepted path) to [lengths[r], lengths[r] + n_r)
     in place and crops the physical length to the longest row: rejected slots are compacted away, not
     masked forever.

A row that finishes leaves a slot that the next waiting prompt reuses in place (`put`; continuous batching);
when no prompt waits, `retain` drops finished rows so a draining batch computes only live rows. A prompt is
prefilled alone (batch 1, exactly as the single-sequence decoder does) and its cache copied into a slot.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from draftsmith.errors import DraftsmithError
from draftsmith.protocol.tree import ancestor_mask, depths


class RaggedCache:
    """The rows' shared cache and each row's length (see the module docstring)."""

    def __init__(self):
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []
        self._verified = 0   # the physical length before the last verify step's W slots

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def physical(self) -> int:
        return self._layers()[0].keys.shape[-2] if self.cache is not None else 0

    def _layers(self) -> list:
        layers = getattr(self.cache, "layers", None)
        if layers is None:
            raise DraftsmithError("Batched decoding needs a transformers version whose DynamicCache has `layers`",
                                  type(self.cache).__name__, "Upgrade transformers to 5.x, or use --batch-size 1")
        for layer in layers:
            if getattr(layer, "is_sliding", False):
                raise DraftsmithError("Batched decoding of sliding-window targets is not supported",
                                      type(layer).__name__, "Use --batch-size 1")
        return layers

    @torch.inference_mode()
    def put(self, row: int, single: DynamicCache) -> None:
        """Copy a prefilled batch-1 cache into `row` (== rows: a new row; < rows: a finished row's slot)."""
        if row > self.rows:
            raise ValueError(f"row {row} of a {self.rows}-row cache")
        if self.cache is None:                # the first row: its cache object becomes the batch's
            self.cache = single
            self.lengths = [single.get_seq_length()]
            self._layers()
            return
        length = single.get_seq_length()
        self._pad_to(length)
        for layer, source in zip(self._layers(), single.layers):
            for name in ("keys", "values"):
                t, s = getattr(layer, name), getattr(source, name)
                if row == self.rows:
                    t = torch.cat([t, t.new_zeros((1,) + t.shape[1:])], dim=0)
                t[row, :, :length] = s[0]
                setattr(layer, name, t)
        if row == self.rows:
            self.lengths.append(length)
        else:
            self.lengths[row] = length

    def _pad_to(self, slots: int) -> None:
        extra = slots - self.physical
        if extra <= 0:
            return
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, torch.cat([t, t.new_zeros(t.shape[:2] + (extra, t.shape[-1]))], dim=-2))

    @torch.inference_mode()
    def retain(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order): finished rows leave when no prompt waits for their slot."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long)
        for layer in self._layers():
            for name in ("keys", "values"):
                t = getattr(layer, name)
                setattr(layer, name, t.index_select(0, index.to(t.device)))
        self.lengths = [self.lengths[r] for r in rows]
        self._crop(max(self.lengths, default=0))

    def verify_inputs(self, inputs: list[list[int]], parents: list[list[int] | None],
                      pad_token: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One verify step's input ids [rows, W], what each query may see [rows, W, slots + W] and positions
        [rows, W] (models/target.py `attention_inputs` makes the mask): row r reads inputs[r] = [root, node 0,
        ...], node i after node parents[r][i] (None: a chain)."""
        if len(inputs) != self.rows:
            raise ValueError(f"{len(inputs)} inputs for {self.rows} rows")
        width, past = max(len(x) for x in inputs), self.physical
        ids = torch.full((self.rows, width), pad_token, dtype=torch.long)
        see = torch.zeros(self.rows, width, past + width, dtype=torch.bool)
        positions = torch.zeros(self.rows, width, dtype=torch.long)
        for r, (x, p) in enumerate(zip(inputs, parents)):
            n, length = len(x), self.lengths[r]
            ids[r, :n] = torch.tensor(x)
            p = list(range(-1, n - 2)) if p is None else p
            see[r, :n, :length] = True
            see[r, :n, past:past + n] = ancestor_mask(p)
            see[r, torch.arange(n, width), past + torch.arange(n, width)] = True   # padding reads its own slot
            positions[r, :n] = torch.tensor([length] + [length + d for d in depths(p)])
            positions[r, n:] = length
        self._verified = past
        return ids, see, positions

    @torch.inference_mode()
    def keep(self, kept: list[list[int]]) -> None:
        """After a verify step: row r keeps the new slots kept[r] (offsets into its inputs: 0 the root, then
        the accepted path), moved to follow its committed slots; the rest of the step's slots go."""
        keep_rows(self._layers(), self.lengths, [self._verified] * self.rows, kept)
        self._crop(max(self.lengths, default=0))

    def _crop(self, slots: int) -> None:
        drop = self.physical - slots
        if drop > 0:
            self.cache.crop(-drop)


@torch.inference_mode()
def keep_rows(layers: list, lengths: list[int], starts: list[int], kept: list[list[int]]) -> None:
    """Row r keeps the slots starts[r] + kept[r][j] (a verify step's new slots: 0 the root, then the accepted path),
    moved to lengths[r] + j to follow its committed slots, in every layer's keys and values at once; lengths
    grow by what each row kept. The ragged cache's new slots start where the longest row ends, the static rows'
    (models/static_rows.py) at each row's own length."""
    if len(kept) != len(lengths):
        raise ValueError(f"{len(kept)} kept lists for {len(lengths)} rows")
    rows, src, dst = [], [], []
    for r, offsets in enumerate(kept):
        for j, offset in enumerate(offsets):
            if starts[r] + offset != lengths[r] + j:
                rows.append(r)
                src.append(starts[r] + offset)
                dst.append(lengths[r] + j)
        lengths[r] += len(offsets)
    if rows:
        device = layers[0].keys.device
        r_i, s_i, d_i = (torch.tensor(v, dtype=torch.long, device=device) for v in (rows, src, dst))
        for layer in layers:
            for t in (layer.keys, layer.values):
                t[r_i, :, d_i] = t[r_i, :, s_i]      # the right side is gathered (a copy) before the write
