"""Batched decoding through the compiled target (`draftsmith eval --compile --batch-size N`): a static KV cache of
several rows, each at its own length.

It keeps the ragged cache's contract (models/batch_cache.py: `put`, `retain`, `verify_inputs`, `keep`) with the
layout of the batch-1 static cache (models/compiled_target.py), so that a row is computed as the batch-1 compiled
forward computes it, up to rounding:

- per layer, keys and values [rows, kv heads, slots, head dim], where `slots` is the batch-1 cache's (its
  max_length + 1): every row's attention runs over the same number of slots as alone;
- row r's committed tokens are its first `lengths[r]` slots; a verify step writes row r's new tokens at ITS OWN
  slots [lengths[r], lengths[r] + n_r) (a scatter, not transformers' one shared write position), where the row
  alone would write them; every query sees its row's committed slots and its ancestors among the new ones;
- a row narrower than the step (W: the widest row's root + draft nodes, at least `row_width`; wider where rows x W
  would be under the graph's `min_width`, models/cpu_linear.py) is padded with copies of its last token: they
  write past the row's new slots (never committed; the last slot where that runs out) and see only their own
  slot, so no real query ever attends them;
- `keep` moves each row's kept slots (the root and accepted path) into place, as the batch-1 cache's `keep` does;
  `retain` drops finished rows (smaller tensors: a draining batch computes live rows only); `put` copies a prompt's
  prefilled batch-1 static cache into a row (the prefill runs alone, exactly as in batch 1).

Up to rounding, not bit for bit: CPU attention sums a query row differently in a block of 1-3 queries than in one of
4+ (measured on SmolLM2, fp32: ~5e-5 on a row's logits). The batch-1 decoder pads its attention's queries so a row
is summed alike at every width (models/row_attention.py); a batched forward keeps transformers' attention, as the
padding would cost 18-23% of a bf16 16-row step of 3-16 tokens a row (bench/target_cost_curves.py, rows 16,
`compiled-onednn` vs `compiled-onednn-sdpa`). Losslessness is therefore checked per row in every `draftsmith eval
--batch-size` report (greedy outputs against the batch-1 plain outputs, every difference audited as a near-tie or
not), as in batch 1.

`row_width`: in bf16 a row of a one-token-wide step (batched plain decoding) rounds differently from the same row
in batch 1, whose single tokens run two rows wide with oneDNN or the row kernel (0.25 on a logit of SmolLM2; a 6-ulp divergence in
an 80-prompt run), while 2- and 3-wide steps gave every row batch 1's logits bit for bit on the AVX512-BF16 host
with oneDNN (80/80 MT-bench prompts equal); and in bf16 a 2-wide step costs what a 1-wide one does. So a
reduced-precision target with either runs batched steps at least two tokens wide (models/target.py
`new_batch_cache`); fp32 keeps one (a 1-wide step costs 24% less at batch 4 and its outputs equalled batch 1's on
80/80 MT-bench prompts). On the AVX2 EPYC with the row kernel 2-wide bf16 rows still round apart in the attention
(32/80 prompts equal, near-ties but one: bench/results/cpu-avx2/batched), and padding the batched attention as
batch 1's made them exact but cost a step 13-60% there.
"""

from __future__ import annotations

import torch
from transformers import StaticCache

from draftsmith.errors import DraftsmithError
from draftsmith.models.batch_cache import keep_rows
from draftsmith.models.compiled_target import StaticKV
from draftsmith.models.slot_layer import SlotLayer
from draftsmith.protocol.tree import ancestor_mask, depths


class StaticRows:
    """Several rows of the compiled target's static cache (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_length: int, min_width: int = 1, row_width: int = 1):
        self.model, self.max_length, self.min_width, self.row_width = model, max_length, min_width, row_width
        self.slots = StaticKV.slots_for(max_length)    # the batch-1 StaticKV's slots (its spares included)
        self.cache: StaticCache | None = None
        self.lengths: list[int] = []

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def _layers(self) -> list[SlotLayer]:
        return self.cache.layers

    @torch.inference_mode()
    def put(self, row: int, single: StaticKV) -> None:
        """Copy a prefilled batch-1 static cache into `row` (== rows: a new row; < rows: a finished row's slot)."""
        if row > self.rows:
            raise ValueError(f"row {row} of a {self.rows}-row cache")
        if single.slots != self.slots:
            raise ValueError(f"a {single.slots}-slot cache put into a {self.slots}-slot one")
        length = single.length
        sources = single.cache.layers
        if self.cache is None:
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.slots)
            self.cache.layers = [SlotLayer(self.slots, torch.zeros_like(s.keys), torch.zeros_like(s.values))
                                 for s in sources]
        for layer, source in zip(self._layers(), sources):
            keys, values = layer.keys, layer.values
            if row == self.rows:
                keys = torch.cat([keys, keys.new_zeros((1,) + keys.shape[1:])]) if self.rows else keys
                values = torch.cat([values, values.new_zeros((1,) + values.shape[1:])]) if self.rows else values
            keys[row, :, :length] = source.keys[0, :, :length]
            values[row, :, :length] = source.values[0, :, :length]
            layer.set(keys, values)
        if row == self.rows:
            self.lengths.append(length)
        else:
            self.lengths[row] = length

    @torch.inference_mode()
    def retain(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order): finished rows leave when no prompt waits for their slot."""
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long)
        if rows:
            for layer in self._layers():
                layer.set(layer.keys.index_select(0, index.to(layer.device)),
                          layer.values.index_select(0, index.to(layer.device)))
        else:
            self.cache = None
        self.lengths = [self.lengths[r] for r in rows]

    def verify_inputs(self, inputs: list[list[int]], parents: list[list[int] | None],
                      pad_token: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One verify step's input ids [rows, W], what each query may see [rows, W, slots] and positions [rows, W]
        (as models/batch_cache.py's); the rows' write slots are set for the forward that follows."""
        if len(inputs) != self.rows:
            raise ValueError(f"{len(inputs)} inputs for {self.rows} rows")
        width = max(self.row_width, max(len(x) for x in inputs))
        if self.rows * width < self.min_width:       # the linear layers' kernel sees at least min_width rows
            width = -(-self.min_width // self.rows)
        ids = torch.full((self.rows, width), pad_token, dtype=torch.long)
        see = torch.zeros(self.rows, width, self.slots, dtype=torch.bool)
        positions = torch.zeros(self.rows, width, dtype=torch.long)
        write_at = torch.zeros(self.rows, width, dtype=torch.long)
        for r, (x, p) in enumerate(zip(inputs, parents)):
            n, length = len(x), self.lengths[r]
            if length + n > self.max_length:
                raise DraftsmithError("The compiled target's static cache is full", length + n,
                                      f"It holds {self.max_length} tokens: give a larger --max-new-tokens budget "
                                      "to size it, or run without --compile")
            p = list(range(-1, n - 2)) if p is None else p
            ids[r, :n] = torch.tensor(x)
            ids[r, n:] = x[-1]
            at = torch.arange(length, length + width).clamp_(max=self.slots - 1)
            write_at[r] = at
            see[r, :n, :length] = True
            see[r, :n, length:length + n] = ancestor_mask(p)
            see[r, torch.arange(n, width), at[n:]] = True          # padding sees its own slot only
            positions[r, :n] = torch.tensor([length] + [length + d for d in depths(p)])
            positions[r, n:] = positions[r, n - 1]
        device = self._layers()[0].device
        for layer in self._layers():
            layer.write_at = write_at.to(device)
        return ids, see, positions

    @torch.inference_mode()
    def keep(self, kept: list[list[int]]) -> None:
        """After a verify step: row r keeps the new slots kept[r] (offsets into its inputs: 0 the root, then the
        accepted path), moved to follow its committed slots."""
        keep_rows(self._layers(), self.lengths, list(self.lengths), kept)
