"""Where the CPU attention sums a key alike at two cache slots: measured once per cache size and precision.

A tree verify writes an off-chain node a whole number of lanes past its plain-decoding slot (compiled_target.py
`tree_slots`); its row gets plain decoding's logits bit for bit only where the attention sums the node's key at the
new slot as it would at the old one. torch's CPU flash attention (aten's FlashAttentionKernel.cpp) computes a block
of up to 512 keys at a time (compiled_target.KEY_BLOCK): scores, their softmax sum lane by lane, then P @ V through
the platform's matrix library, whose own blocking of the key dimension is neither documented nor fixed: on the
project CPU (AMD EPYC, torch 2.13) MKL's fp32 product sums keys in halves of a 200-300 slot cache (288 slots: two of
144) and in blocks of 192 from each 512-key block of a larger one, and a key moved across such a boundary is summed
in another group (SmolLM2 fp32: 214 of 1,530 off-chain rows differed from plain decoding's by ~1e-4, every one across
a boundary; bench/results/cpu-exact-fp32-trees).

`moves_apart` finds those boundaries by experiment, for the shapes the target attends with: for each slot x, one
attention over keys 0..x and one with key x moved `lanes` slots on (random queries, keys and values; 16 queries of
every head); an output that differs marks the move. A node may move only across moves not marked. The experiment
sees a regrouped sum whenever it changes a bit of the output: reliably in fp32 (a 192-key block's boundary shows in
every one of its 16 moves), rarely in bf16, whose output keeps 8 bits (there oneDNN's product groups keys otherwise
still, not found: bf16 off-chain rows stay up to rounding, models/row_attention.py).
"""

from __future__ import annotations

import functools

import torch

QUERIES = 16
"""Query rows per experiment: one block of the kernel's (it splits queries in blocks of 32), every row a trial."""


def for_model(model: torch.nn.Module, slots: int, lanes: int) -> frozenset[int]:
    """`moves_apart` for a transformers causal LM's attention shapes and precision."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return moves_apart(slots, lanes, next(model.parameters()).dtype, heads, kv_heads, head_dim)


@functools.lru_cache(maxsize=16)
@torch.inference_mode()
def moves_apart(slots: int, lanes: int, dtype: torch.dtype, heads: int, kv_heads: int,
                head_dim: int) -> frozenset[int]:
    """The slots x whose key torch's CPU attention sums otherwise at x + lanes, in a cache of `slots` slots (module
    docstring). Deterministic: its random tensors come from a fixed seed."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, QUERIES, head_dim, generator=g).to(dtype)
    k = torch.randn(1, kv_heads, slots, head_dim, generator=g).to(dtype)
    v = torch.randn(1, kv_heads, slots, head_dim, generator=g).to(dtype)
    hidden = torch.finfo(dtype).min            # transformers' additive mask, as models/target.py builds it
    gqa = {"enable_gqa": True} if kv_heads != heads else {}

    def attend(keys, values, seen: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(1, 1, QUERIES, slots, dtype=dtype).masked_fill(~seen, hidden)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, **gqa)

    apart = []
    moved_k, moved_v = k.clone(), v.clone()
    for x in range(slots - lanes):
        seen = torch.zeros(slots, dtype=torch.bool)
        seen[:x + 1] = True
        plain = attend(k, v, seen)
        seen[x], seen[x + lanes] = False, True
        moved_k[:, :, x + lanes], moved_v[:, :, x + lanes] = k[:, :, x], v[:, :, x]
        if not torch.equal(attend(moved_k, moved_v, seen), plain):
            apart.append(x)
        moved_k[:, :, x + lanes], moved_v[:, :, x + lanes] = k[:, :, x + lanes], v[:, :, x + lanes]
    return frozenset(_around_boundaries(apart, lanes, slots))


def _around_boundaries(seen: list[int], lanes: int, slots: int) -> set[int]:
    """Every move that may cross the block boundaries the seen moves cross. A move x crosses a boundary in (x, x +
    lanes]; moves seen less than a lane apart cross the same one, somewhere in (their last, their first + lanes]; every
    move crossing any slot of that span is marked. In fp32 the experiment sees all `lanes` moves before a boundary, the
    span is the boundary itself and nothing more is marked; in bf16 it sees a few of them (two of 16 before slot 384
    of a 464-slot cache), and the span covers the rest."""
    out: set[int] = set()
    cluster: list[int] = []
    for x in sorted(seen) + [None]:
        if cluster and (x is None or x - cluster[-1] >= lanes):
            out.update(range(max(0, cluster[-1] + 1 - lanes), min(slots - lanes, cluster[0] + lanes)))
            cluster = []
        if x is not None:
            cluster.append(x)
    return out
