"""A held-out split that every run, process and machine agrees on.

Training data (distill/) and the `sharegpt-heldout` benchmark (eval/benchmarks.py) must
see disjoint conversations, or acceptance measured on the benchmark is inflated by
memorisation. Both sides call `is_heldout` on the same key, so the split needs no file to
be stored or shipped; the module sits below both (beside assets.py), as a type two layers share.

Python's `hash()` is salted per process (PYTHONHASHSEED), so it would give a different
split on every run; sha256 of the key's UTF-8 bytes gives the same answer everywhere.
"""

from __future__ import annotations

import hashlib
import re

from draftsmith.errors import DraftsmithError

_BUCKETS = 2**64
_CHUNK_SUFFIX = re.compile(r"_\d+$")


def conversation_key(record_id: str) -> str:
    """The key a record is split by: its id without a ShareGPT chunk suffix.

    ShareGPT stores one long conversation as records `X_0`, `X_1`, ...; splitting by the raw id
    would put sibling chunks on both sides (207 conversations in the packaged file).
    """
    return _CHUNK_SUFFIX.sub("", record_id)


def is_heldout(key: str, fraction: float = 0.02) -> bool:
    """True when `key` (a conversation id; a `_N` chunk suffix is ignored) falls in the held-out `fraction` of the key space.

    The first 8 bytes of sha256(key) are read as a number u in [0, 1); the key is held out
    when u < fraction. Raising `fraction` only adds keys to the held-out set, never moves
    one out of it.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DraftsmithError(
            "the held-out fraction must lie in [0, 1]",
            seen=fraction,
            fix="Use e.g. 0.02 to hold out 2% of conversations",
        )
    digest = hashlib.sha256(conversation_key(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * _BUCKETS


def split_conversations(
    conversations: list[dict], heldout_fraction: float
) -> tuple[list[dict], list[dict]]:
    """(train, heldout) by `is_heldout(id, fraction)`: the same ids land on the same side in
    every run, and the `sharegpt-heldout` benchmark uses the same keys."""
    train, heldout = [], []
    for conversation in conversations:
        held = is_heldout(str(conversation["id"]), heldout_fraction)
        (heldout if held else train).append(conversation)
    return train, heldout
