"""Where conversations come from: the packaged ShareGPT, a .jsonl file, or a saved dataset folder.
Records are normalised to OpenAI messages by distill/data.py; malformed ones are skipped and counted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from draftsmith.distill.data import log_skips, normalize_conversation
from draftsmith.distill.regenerate import is_regenerated, read_regenerated
from draftsmith.errors import DraftsmithError

if TYPE_CHECKING:
    import datasets


def load_conversations(source: str) -> list[dict]:
    """Conversations as [{"id": str, "messages": [...]}, ...] from a named source or a path.

    `source` is "sharegpt" (the packaged ShareGPT V3), a `.jsonl` file (one OpenAI-messages
    or ShareGPT record per line), a folder written by `draftsmith data regenerate`, or a folder
    written by `datasets.Dataset.save_to_disk`.
    The id is the record's "id", else its line number (jsonl, from 1) or row index (folder);
    malformed records are skipped and the counts logged.
    """
    path = Path(source)
    if source == "sharegpt":
        from draftsmith import assets

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
        messages = normalize_conversation(record, skips)
        if messages is not None:
            rid = record.get("id") if isinstance(record, dict) else None
            conversations.append({"id": str(index if rid is None else rid), "messages": messages})
    log_skips(f"conversations from {source}", len(conversations), skips)
    return conversations


def _read_jsonl(path: Path) -> Iterable[tuple[int, object]]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError:
                    yield line_no, None  # counted as malformed by normalize_conversation


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
