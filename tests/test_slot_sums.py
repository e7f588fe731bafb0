"""models/slot_sums.py: the probe of where the CPU attention sums a key alike at two slots."""

import torch

from draftsmith.models import slot_sums


def test_every_move_the_probe_allows_sums_alike_with_other_data():
    """The guarantee tree_slots relies on: a key moved one lane on across no marked move gets the same output bits,
    with queries, keys and values the probe never saw (more rows, other seeds), fp32 and bf16; the probe is
    deterministic. (That it finds the boundaries: test_compiled_target's fp32 tree rows across MKL's key blocks.)"""
    slots, lanes, heads, kv_heads, dim = 224, 16, 4, 2, 16
    for dtype in (torch.float32, torch.bfloat16):
        apart = slot_sums.moves_apart(slots, lanes, dtype, heads, kv_heads, dim)
        slot_sums.moves_apart.cache_clear()
        assert slot_sums.moves_apart(slots, lanes, dtype, heads, kv_heads, dim) == apart
        for seed in (1, 2):
            g = torch.Generator().manual_seed(seed)
            q = (torch.randn(1, heads, 32, dim, generator=g) * 2).to(dtype)
            k, v = (torch.randn(2, 1, kv_heads, slots, dim, generator=g)).to(dtype)
            for x in range(0, slots - lanes, 3):
                if x in apart:
                    continue
                seen = torch.zeros(32, slots, dtype=torch.bool)
                seen[:, :x + 1] = True
                mask = torch.zeros(1, 1, 32, slots, dtype=dtype).masked_fill(~seen, torch.finfo(dtype).min)
                plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                k2, v2 = k.clone(), v.clone()
                k2[:, :, x + lanes], v2[:, :, x + lanes] = k[:, :, x], v[:, :, x]
                mask[..., x], mask[..., x + lanes] = torch.finfo(dtype).min, 0
                moved = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, attn_mask=mask, enable_gqa=True)
                assert torch.equal(moved, plain), (dtype, seed, x)


def test_for_model_reads_the_attention_shapes_and_precision(monkeypatch):
    seen = []
    monkeypatch.setattr(slot_sums, "moves_apart", lambda *a: seen.append(a) or frozenset())
    from conftest import tiny_llama
    model = tiny_llama(0).to(torch.bfloat16)
    assert slot_sums.for_model(model, 160, 16) == frozenset()
    assert seen == [(160, 16, torch.bfloat16, 4, 2, 16)]
