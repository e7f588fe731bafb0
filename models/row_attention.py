"""The batch-1 CPU target's attention: every query row computed alike whatever the forward's width.

A verify forward over n tokens and plain decoding's one-token forwards must give each row the same logits, bit for
bit, for speculative decoding to be exactly lossless in any precision. The linear layers give that (oneDNN computes
each row of a 2+ row call alike, draftsmith's row kernel every row alike: models/cpu_linear.py), attention did not: torch's CPU flash attention splits the
queries into blocks of 32 (of 64 from 192 queries, 256 from 768), and a block of 1-3 queries is summed differently
from a block of 4 or more (measured: fp32 rows differ by ~1e-6; in bf16 the output's rounding then flips now and
then, so a bf16 verify diverged from bf16 plain decoding on near-ties). Here every attention call gets three more
query rows (copies of its last, dropped after): a real row r of n then sits in a block of min(32, n + 3 - 32*(r //
32)) >= 4 rows, so every real row is summed as in a block of 4+, at any width under 189 (the block size of 32 holds
to 191 queries; longer forwards are prefills, shared by plain and speculative decoding). Measured cost at batch 1:
none (bench/target_cost_curves.py, SmolLM2, one forward of 1-8 tokens: fp32 36.6 ms with the padding, 39.5 without;
bf16 27.7 vs 29.0). The extra rows always number three: a branch on the width would make torch.compile build a graph
per branch (a one-query forward, below, is a graph of its own anyway).

Left as transformers' sdpa: a ONE-query forward (with oneDNN or the row kernel the batch-1 decoder never runs one: a
single token runs two rows wide, models/cpu_linear.py); a batched forward of several rows (the padding would cost 18-23% of a bf16
16-row step on the AVX512-BF16 host, 13-60% of a 4- or 16-row step on the AVX2 one, bench/target_cost_curves.py
`compiled-onednn-sdpa` / `compiled-rows-sdpa`; its rows equal batch 1's up to rounding, models/static_rows.py); a forward without a mask (transformers skips it for a plain causal prefill). Both size
checks cost no graph: dynamo builds one-row and one-query graphs of their own anyway.

A tree verify's off-chain rows come as close by where its nodes sit in the cache (models/compiled_target.py
`tree_slots`): packed one after another, a second child and its subtree would attend their ancestors at other cache
slots than plain decoding, and the attention's sum over slots would group its terms otherwise; spread, and kept within
the matrix library's blocks of keys (models/slot_sums.py), every fp32 row is plain decoding's bit for bit, while in bf16
a few still round apart (bench/results/cpu-exact-fp32-trees). Installed on CPU targets only (`install`).
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:            # a transformers without attention registries: `install` leaves its sdpa
    AttentionInterface = AttentionMaskInterface = sdpa_mask = None

NAME = "draftsmith_row_sdpa"
EXTRA_ROWS = 3


def row_invariant_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' sdpa attention over the queries and EXTRA_ROWS copies of the last (query: [batch, heads,
    queries, dim]; the output is [batch, queries, heads, dim])."""
    rows, n = query.shape[0], query.shape[2]
    if attention_mask is None or n == 1 or rows > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    query = torch.cat([query, query[:, :, -1:].expand(-1, -1, EXTRA_ROWS, -1)], dim=2)
    attention_mask = torch.cat([attention_mask, attention_mask[:, :, -1:].expand(-1, -1, EXTRA_ROWS, -1)], dim=2)
    out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    return out[:, :n], weights


def install(model: torch.nn.Module) -> bool:
    """Make `model` attend with `row_invariant_sdpa` where it uses transformers' sdpa attention (its masks are built
    as sdpa's). Returns whether it was installed."""
    if AttentionInterface is None:
        return False
    if getattr(model.config, "_attn_implementation", None) == NAME:   # a second compile of the same model
        return True
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(NAME, row_invariant_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, KeyError, AttributeError):   # a transformers that refuses registered names: sdpa stays
        return False
    return model.config._attn_implementation == NAME


def uninstall(model: torch.nn.Module) -> None:
    """Back to transformers' sdpa attention (bench/target_cost_curves.py's `-sdpa` paths time the difference)."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")
