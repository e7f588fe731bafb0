"""Several sequences through ONE forward of a transformers causal LM drafter (kinds small_lm and parallel).

Each sequence (row) keeps its own DynamicCache at its own length and brings its own new tokens (an `LMFeed`).
`forward_rows` copies the caches into one, padded to the longest (zeros after each row's end), puts each row's
new tokens at the END of the step's new slots (left-padded, so the last m positions of every row line up and
the model's own `logits_to_keep` returns them, final soft-capping and all), lets every query see its own cached
slots and its own new slots only (a padding query sees itself, so no softmax is empty), runs the model once and
appends each row's new keys and values to its own cache. A row computes as it would alone, up to the
floating-point order of a wider matmul; a lone row runs exactly as before (its own cache, no copy).

Rows with a long feed (a prompt read after a reset) run alone: padded to their length, every short row would
pay for it. Drafters with sliding-window layers run row by row (their caches crop themselves).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from draftsmith.models.row_batch import pad_rows
from draftsmith.models.target import attention_inputs, cache_kwarg, new_cache

LONG_FEED = 16
"""A row feeding more new tokens than this runs alone."""


class LMFeed(NamedTuple):
    """One row's new tokens; `mask` [t, cached + t] bool (None: causal after every cached slot) and `positions`
    [t] (None: cached, cached + 1, ...) for a tree's nodes."""

    tokens: list[int]
    mask: torch.Tensor | None = None
    positions: list[int] | None = None


@torch.inference_mode()
def forward_rows(model: torch.nn.Module, caches: list, feeds: list[LMFeed], keep: int) -> list[torch.Tensor]:
    """Logits [min(keep, t_r), V] float32 of each row's last `keep` new positions; each row's cache is extended
    by its own new tokens."""
    out: list[torch.Tensor | None] = [None] * len(feeds)
    together = [r for r, f in enumerate(feeds) if len(f.tokens) <= LONG_FEED]
    if len(together) < 2 or _sliding(caches):
        together = []
    for r in range(len(feeds)):
        if r not in together:
            out[r] = _alone(model, caches[r], feeds[r], keep)
    if together:
        for r, logits in zip(together, _packed(model, [caches[r] for r in together], [feeds[r] for r in together],
                                               keep)):
            out[r] = logits
    return out


def _alone(model, cache, feed: LMFeed, keep: int) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = torch.tensor([feed.tokens], dtype=torch.long, device=device)
    attend = {}
    if feed.mask is not None:
        n = cache.get_seq_length()
        positions = feed.positions if feed.positions is not None else list(range(n, n + len(feed.tokens)))
        attend = attention_inputs(model, feed.mask, positions)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=keep, **{cache_kwarg(model): cache}, **attend)
    return out.logits[0, -min(keep, len(feed.tokens)):].float()


def _packed(model, caches: list, feeds: list[LMFeed], keep: int) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    lengths = [c.get_seq_length() for c in caches]
    counts = [len(f.tokens) for f in feeds]
    rows, width, new = len(feeds), max(lengths), max(counts)
    ids = torch.zeros(rows, new, dtype=torch.long)
    see = torch.zeros(rows, new, width + new, dtype=torch.bool)
    positions = torch.zeros(rows, new, dtype=torch.long)
    for r, (f, n, t) in enumerate(zip(feeds, lengths, counts)):
        pad = new - t
        ids[r, pad:] = torch.tensor(f.tokens)
        own = f.mask if f.mask is not None else torch.ones(t, n + t, dtype=torch.bool).tril(n)
        see[r, pad:, :n] = own[:, :n].cpu()
        see[r, pad:, width + pad:] = own[:, n:].cpu()
        see[r, torch.arange(pad), width + torch.arange(pad)] = True          # padding reads its own slot
        positions[r, pad:] = torch.tensor(f.positions if f.positions is not None else range(n, n + t))
        positions[r, :pad] = n
    packed = new_cache(model)
    if width:
        layers = [c.layers for c in caches]
        full = next(c for c, n in zip(layers, lengths) if n)          # a row with an empty cache has no shapes
        for i in range(len(full)):
            keys, values = (pad_rows([getattr(c[i], name) if n else getattr(full[i], name)[:, :, :0]
                                      for c, n in zip(layers, lengths)], width) for name in ("keys", "values"))
            packed.update(keys, values, i)
    out = model(input_ids=ids.to(device), use_cache=True, logits_to_keep=keep, **{cache_kwarg(model): packed},
                **attention_inputs(model, see, positions))
    for i, layer in enumerate(packed.layers):
        for r, (cache, t) in enumerate(zip(caches, counts)):
            start = width + new - t
            cache.update(layer.keys[r: r + 1, :, start:], layer.values[r: r + 1, :, start:], i)
    logits = out.logits.float()
    return [logits[r, logits.shape[1] - min(keep, t):] for r, t in enumerate(counts)]


def _sliding(caches: list) -> bool:
    return any(getattr(layer, "is_sliding", False) for c in caches for layer in getattr(c, "layers", []))
