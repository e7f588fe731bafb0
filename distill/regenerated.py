"""A folder written by `draftsmith data regenerate` (distill/regenerate.py), read back: its manifest,
its shards and conversations.jsonl, each checked as it is read, so a damaged file is refused by name
(what is wrong, and how to write it again) instead of read as far as it goes.

distill/sources.py reads a finished folder as data through `is_regenerated` / `read_regenerated`;
the regeneration run writes and resumes it through the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

from draftsmith.errors import DraftsmithError
from draftsmith.folders import marker_kind

FORMAT = "draftsmith-regenerated/1"
STATS = ("conversations", "dropped", "answers", "truncated", "stopped_context", "stopped_empty",
         "new_tokens", "seconds")


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest.json (None: there is none); a damaged one is refused, naming it."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    fix = "Start the regeneration again with --overwrite, or choose another --out"
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DraftsmithError("The folder's manifest.json is not valid JSON", f"{path}: {err}", fix) from None
    if not isinstance(manifest, dict):
        raise DraftsmithError("The folder's manifest.json is damaged (not a JSON object)", str(path), fix)
    plan = manifest.get("plan")
    if manifest.get("format") == FORMAT and not (isinstance(plan, dict) and all(
            isinstance(plan.get(k), int) and not isinstance(plan.get(k), bool) and plan[k] >= 0
            for k in ("shards", "shard_size", "conversations"))):
        raise DraftsmithError("The folder's manifest.json is damaged (its plan names no shards)", str(path), fix)
    return manifest


def shard_path(folder: Path, index: int) -> Path:
    return folder / "shards" / f"{index:05d}.jsonl"


def read_shard(folder: Path, index: int) -> tuple[dict, str]:
    """A written shard's counts and records, checked: its .json holds the counts, its .jsonl as many
    records as they say, each a JSON line."""
    path = shard_path(folder, index)
    fix = f"Delete {path.name} and {path.with_suffix('.json').name} from shards/ and rerun the same command: " \
          "that shard is written again"
    try:
        stats = json.loads(path.with_suffix(".json").read_bytes().decode("utf-8"))
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DraftsmithError("A regenerated shard cannot be read", f"{path.parent}/{path.stem}: {err}", fix) from None
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), (int, float)) for k in STATS):
        raise DraftsmithError("A regenerated shard's counts are damaged", str(path.with_suffix(".json")), fix)
    lines = [line for line in text.splitlines() if line.strip()]
    bad = next((i for i, line in enumerate(lines, start=1) if json_record(line) is None), None)
    if bad is not None or len(lines) != stats["conversations"]:
        why = f"line {bad} is not a JSON record" if bad is not None else \
            f"{len(lines)} records where its counts say {stats['conversations']}"
        raise DraftsmithError(f"A regenerated shard is damaged ({why})", str(path), fix)
    return stats, text


def json_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def is_regenerated(path: Path) -> bool:
    """A `data regenerate` folder: its manifest says so, or (a damaged manifest) its .draftsmith marker."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    if marker_kind(Path(path)) == "regenerated":
        return True
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return False


def read_regenerated(folder: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a finished regeneration, for distill/sources.py; a damaged
    conversations.jsonl (cut short, or a line that is not a record) is refused, naming it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("format") != FORMAT:
        raise DraftsmithError("This folder's manifest.json is not a regeneration's", f"{folder}: format "
                              f"{manifest.get('format')!r}", "Point data.source at a `draftsmith data regenerate` folder")
    if not manifest.get("complete"):
        n = manifest["plan"]["shards"]
        done = len(list((folder / "shards").glob("*.jsonl")))
        raise DraftsmithError("This regeneration is not finished", f"{folder}: {done} of {n} shards written",
                              "Rerun the same `draftsmith data regenerate` command: it resumes where it stopped")
    path = folder / "conversations.jsonl"
    fix = "Rerun the same `draftsmith data regenerate` command: it writes conversations.jsonl again from shards/"
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DraftsmithError("The regeneration's conversations.jsonl cannot be read", f"{path}: {err}", fix) from None
    rows = [(i, json_record(line)) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    bad = next((i for i, record in rows if record is None), None)
    if bad is not None:
        raise DraftsmithError(f"The regeneration's conversations.jsonl is damaged (line {bad} is not a JSON record)",
                              str(path), fix)
    counts = manifest.get("counts")
    expected = counts.get("conversations") if isinstance(counts, dict) else None
    if len(rows) != expected:
        raise DraftsmithError("The regeneration's conversations.jsonl holds another number of records than its "
                              "manifest.json counts", f"{path}: {len(rows)} records, manifest {expected}", fix)
    return rows
