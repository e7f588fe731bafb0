"""Where conversations come from: the packaged ShareGPT, a .jsonl file, or a saved dataset folder.
Records are normalised to OpenAI messages by distill/data.py; malformed ones are skipped and counted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from draftsmith import assets
from draftsmith.distill.data import log_skips, normalize_conversation
from draftsmith.distill.regenerated import is_regenerated, read_regenerated
from draftsmith.errors import DraftsmithError

if TYPE_CHECKING:
    import datasets


def load_conversations(source: str, max_malformed_fraction: float | None = None) -> list[dict]:
    """Conversations as [{"id": str, "messages": [...]}, ...] from a named source or a path.

    `source` is "sharegpt" (the packaged ShareGPT V3), a `.jsonl` file (one OpenAI-messages
    or ShareGPT record per line), a folder written by `draftsmith data regenerate`, or a folder
    written by `datasets.Dataset.save_to_disk`.
    The id is the record's "id", else its line number (jsonl, from 1) or row index (folder);
    malformed records (not UTF-8, not JSON, not a conversation) are skipped and the counts printed.
    None usable, or more than `max_malformed_fraction` of them malformed (None: no limit), is
    refused: that is the wrong file or the wrong format, not noise.
    """
    path = Path(source)
    if source == "sharegpt":
        rows = list(enumerate(assets.load_sharegpt()))
    elif is_regenerated(path):     # a `draftsmith data regenerate` folder
        rows = read_regenerated(path)
    elif path.is_dir():
        rows = list(enumerate(_load_saved(path)))
    elif path.is_file() and path.suffix == ".jsonl":
        rows = list(_read_jsonl(path))
    else:
        raise DraftsmithError(
            "unknown conversation source",
            seen=source,
            fix="Use 'sharegpt', a path to a .jsonl file, or a folder saved by "
            "datasets.Dataset.save_to_disk",
        )
    skips: Counter = Counter()
    conversations = []
    for index, record in rows:
        if isinstance(record, _Unreadable):
            skips[record.reason] += 1
            continue
        messages = normalize_conversation(record, skips)
        if messages is not None:
            rid = record.get("id") if isinstance(record, dict) else None
            conversations.append({"id": str(index if rid is None else rid), "messages": messages})
    log_skips(f"conversations from {source}", len(conversations), skips)
    check_malformed(source, len(rows), skips, max_malformed_fraction)
    return conversations


def check_malformed(source: str, total: int, skips: Counter, max_fraction: float | None) -> None:
    """Refuse data of which none, or more than `max_fraction`, is usable (see load_conversations)."""
    malformed = sum(skips.values())
    if not total or (malformed < total and (max_fraction is None or malformed <= max_fraction * total)):
        return
    reasons = ", ".join(f"{reason}: {n}" for reason, n in skips.most_common(4))
    raise DraftsmithError(
        f"{malformed} of {total} records in {source} are malformed ({reasons})",
        seen="no usable conversation" if malformed == total else
        f"{malformed / total:.1%} > data.max_malformed_fraction {max_fraction}",
        fix='Check it holds conversations, one {"messages": [{"role": ..., "content": ...}, ...]} or ShareGPT '
        '{"conversations": [{"from": ..., "value": ...}, ...]} per line; or raise data.max_malformed_fraction '
        "to train on the rest",
    )


class _Unreadable:
    """A .jsonl line that is not a record at all (counted as malformed, with this reason)."""

    def __init__(self, reason: str):
        self.reason = reason


def _read_jsonl(path: Path) -> Iterable[tuple[int, object]]:
    with path.open("rb") as f:   # bytes, decoded per line: one binary line does not stop the file
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, _Unreadable("not UTF-8 text")
                continue
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    yield line_no, _Unreadable("not JSON")


def _load_saved(path: Path) -> datasets.Dataset:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DraftsmithError(
            "the folder is not a dataset saved with datasets' save_to_disk",
            seen=str(path),
            fix="Point at a folder written by Dataset.save_to_disk, or at a .jsonl file",
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            return loaded["train"]
        if len(loaded) == 1:
            return next(iter(loaded.values()))
        raise DraftsmithError(
            "the saved DatasetDict has several splits and none is named 'train'",
            seen=sorted(loaded),
            fix="Save the split to train on by itself",
        )
    return loaded
