"""The mask token of the drafters that draft from mask rows (P-EAGLE, DFlash, DSpark): an id of the
target's vocabulary. Whenever the id occurs as a real token it reads as the mask too (in draftsmith
as in speculators), so the default is a token the training data never holds.
"""

from __future__ import annotations

import torch


def choose_mask_token(vocab_size: int, train_rows=None, tokenizer=None, explicit: int | None = None) -> int:
    """speculators' order (an explicit id, the tokenizer's mask token, an embedding row no token uses),
    then — instead of its pad/eos/unk fallback, which every answer may hold — the id the training data
    holds least often, the tokenizer's special tokens (not eos, bos, pad, unk) first among equals, then
    the lowest id."""
    if explicit is not None:
        return explicit
    if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
        return int(tokenizer.mask_token_id)
    if tokenizer is not None and len(tokenizer) < vocab_size:
        return len(tokenizer)
    counts = torch.zeros(vocab_size, dtype=torch.float64, device="cpu")     # "cpu": the dry run builds on meta
    for row in train_rows or []:
        ids = torch.as_tensor(row["input_ids"], device="cpu")
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size].double()
    common = {getattr(tokenizer, n, None) for n in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}      # SmolLM2's <repo_name>, ... live here
    special = set(getattr(tokenizer, "all_special_ids", None) or []) | {i for i, t in added.items()
                                                                        if getattr(t, "special", False)}
    counts[[i for i in special if i not in common and i < vocab_size]] -= 0.5   # wins a tie with an ordinary id
    counts[[i for i in common if i is not None and i < vocab_size]] += 0.5      # loses one
    return int(torch.argmin(counts))   # argmin returns the first (lowest) id among equals
