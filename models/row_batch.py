"""Several sequences through ONE forward of a small head with its own KV cache (batched decoding's drafting).

Each sequence (row) keeps its own cache, a list [k, v] of [1, kv heads, length, head dim] (models/layers.py's
Attention), at its own length, and brings its own new rows (a `Feed`). `pack` pads the caches to the longest
(zeros after each row's end) and the new rows to the most numerous, and builds one boolean attention mask
[rows, 1, new, cached + new] that keeps every row to its own cached positions and its own new rows (a padded
query sees only itself, so no softmax is empty); `unpack` hands each row its cache extended by its own new keys
and values. A head that reads [rows, new] inputs with that cache and mask computes each row as it would alone,
up to the floating-point order of a wider matmul. `pad_rows` alone serves heads whose cache is read, not
extended (a block drafter's injected context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Feed(NamedTuple):
    """One row's new inputs: hidden [T, H] (the head's feature input), tokens [T], `start` = the rows its cache
    holds, positions [T] (None: start, start + 1, ...), mask [T, start + T] bool (None: causal among the new
    rows, every cached row visible)."""

    hidden: torch.Tensor
    tokens: list[int]
    start: int
    positions: list[int] | None = None
    mask: torch.Tensor | None = None


@dataclass
class Packed:
    ids: torch.Tensor          # [R, T] (0 in padding)
    hidden: torch.Tensor       # [R, T, H]
    positions: torch.Tensor    # [R, T]
    mask: torch.Tensor         # [R, 1, T, L + T]
    cache: list                # [k, v], each [R, kv heads, L, D] ([] when every row's is empty): the head's
                               # attention extends it in place
    width: int                 # L, the padded cache length
    counts: list[int]          # T_r, each row's new rows


def pack(caches: list[list[torch.Tensor]], feeds: list[Feed]) -> Packed:
    """The inputs of one forward over every row; every cache must hold its row's `start` positions."""
    device = feeds[0].hidden.device
    lengths = [f.start for f in feeds]
    counts = [len(f.tokens) for f in feeds]
    for cache, n in zip(caches, lengths):
        if (cache[0].shape[2] if cache else 0) != n:
            raise ValueError(f"a row's cache holds {cache[0].shape[2] if cache else 0} positions, its feed says {n}")
    rows, width, new = len(feeds), max(lengths), max(counts)
    ids = torch.zeros(rows, new, dtype=torch.long, device=device)
    hidden = feeds[0].hidden.new_zeros(rows, new, feeds[0].hidden.shape[-1])
    positions = torch.zeros(rows, new, dtype=torch.long, device=device)
    mask = torch.zeros(rows, 1, new, width + new, dtype=torch.bool, device=device)
    for r, (f, n, t) in enumerate(zip(feeds, lengths, counts)):
        ids[r, :t] = torch.tensor(f.tokens, device=device)
        hidden[r, :t] = f.hidden
        positions[r, :t] = torch.tensor(f.positions if f.positions is not None else range(n, n + t), device=device)
        own = f.mask if f.mask is not None else torch.ones(t, n + t, dtype=torch.bool, device=device).tril(n)
        mask[r, 0, :t, :n] = own[:, :n]
        mask[r, 0, :t, width: width + t] = own[:, n:]
        mask[r, 0, t:, width + t:] = torch.eye(new - t, dtype=torch.bool, device=device)   # padded queries
    shape = next((c for c in caches if c), None)     # an empty cache (a row's first forward) holds no shape
    cache = [] if shape is None else [pad_rows([c[i] if c else shape[i][:, :, :0] for c in caches], width)
                                      for i in range(2)]
    return Packed(ids, hidden, positions, mask, cache, width, counts)


def unpack(packed: Packed, caches: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Each row's cache extended by its own new keys and values (from the packed cache after the forward)."""
    out = []
    for r, (cache, t) in enumerate(zip(caches, packed.counts)):
        new = [p[r: r + 1, :, packed.width: packed.width + t] for p in packed.cache]
        out.append([torch.cat([old, n], 2) for old, n in zip(cache, new)] if cache else new)
    return out


def pad_rows(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """[1, heads, L_r, D] each -> [R, heads, width, D], zeros after each row's end (a row's mask must hide them)."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], width, first.shape[3])
    for r, t in enumerate(tensors):
        out[r, :, : t.shape[2]] = t[0]
    return out
