"""Which checkpoints of a run can be trusted: complete, unmodified, free of symbolic links.

A checkpoint `checkpoints/step-N/` is written into `.tmp-step-N/` and renamed when whole; its
meta.json lists every file with its size and sha256. Sizes are the cheap test (`is_complete`);
hashes are checked before a checkpoint is resumed or exported (`verify`). Old checkpoints are
renamed to `.old-step-N/` before deletion, so a deletion cut short leaves nothing under `step-*`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

from draftsmith.errors import DraftsmithError
from draftsmith.folders import sha256_of


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "checkpoints").glob("step-*"))


def read_meta(ckpt: Path) -> dict:
    meta_path = ckpt / "meta.json"
    if meta_path.is_symlink():
        raise ValueError("meta.json is a symbolic link")
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise ValueError("meta.json lists no files")
    return meta


def walk(root: Path) -> list[Path]:
    """Every entry under `root`, without descending into symbolic links (rglob would)."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        found += [Path(folder) / name for name in dirs + files]
    return sorted(found)


def symlinks_in(root: Path) -> list[Path]:
    return [p for p in walk(root) if p.is_symlink()]


def problem(ckpt: Path, hashes: bool = False) -> str | None:
    """Why `ckpt` cannot be used (None when it can): no meta.json, a symbolic link inside, a file missing
    or of another size than meta.json says, or (with `hashes`) of another sha256."""
    ckpt = Path(ckpt)
    if ckpt.is_symlink() or not ckpt.is_dir():
        return "not a folder"
    try:
        meta = read_meta(ckpt)
    except (OSError, ValueError) as err:
        return f"no valid meta.json ({err})"
    links = symlinks_in(ckpt)
    if links:
        return f"{links[0].relative_to(ckpt)} is a symbolic link"
    for rel, size in meta["files"].items():
        path = ckpt / rel
        if ckpt.resolve() not in path.resolve().parents:
            return f"meta.json names a file outside the checkpoint ({rel})"
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, meta.json says {size}"
    if hashes:
        digests = meta.get("sha256")
        if digests is None:
            return None if "format" not in meta else "meta.json has no sha256 of its files"
        for rel in meta["files"]:
            if digests.get(rel) != sha256_of(ckpt / rel):
                return f"{rel} does not match its sha256 in meta.json (the file was modified or damaged)"
    return None


def is_complete(ckpt: Path) -> bool:
    return problem(ckpt) is None


def verify(ckpt: Path) -> str | None:
    return problem(ckpt, hashes=True)


def latest_checkpoint(run_dir: Path, hashes: bool = True) -> Path | None:
    """The newest usable checkpoint; every newer one that is not is named in a warning."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        why = problem(ckpt, hashes)
        if why is None:
            return ckpt
        warnings.warn(f"skipping incomplete or corrupt checkpoint {ckpt}: {why}")
    return None


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint `--resume` continues from; refuses (saying why) when there is none."""
    found = list_checkpoints(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        return ckpt
    if not found:
        raise DraftsmithError("--resume found no checkpoint to continue from", str(Path(run_dir) / "checkpoints"),
                              "Train without --resume to start the run (a run saves every checkpoint.every steps)")
    reasons = "; ".join(f"{c.name}: {problem(c, True)}" for c in found)
    raise DraftsmithError("--resume found no usable checkpoint in this run", reasons,
                          "Restore the files from a backup, or start again with --overwrite")


def file_digests(root: Path) -> tuple[dict[str, int], dict[str, str]]:
    """(size, sha256) of every regular file under `root`, by relative path."""
    files = [p for p in walk(root) if p.is_file() and not p.is_symlink()]
    return ({str(p.relative_to(root)): p.stat().st_size for p in files},
            {str(p.relative_to(root)): sha256_of(p) for p in files})


def remove_checkpoint(ckpt: Path) -> None:
    """Rename, then delete: a deletion cut short leaves a `.old-step-N` folder, never a half `step-N`."""
    old = ckpt.with_name(f".old-{ckpt.name}")
    shutil.rmtree(old, ignore_errors=True)
    ckpt.rename(old)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale(run_dir: Path) -> list[str]:
    """At a run's start: remove what an interrupted save or deletion left (`.tmp-step-*`, `.old-step-*`)
    and checkpoints older than the newest complete one that are themselves incomplete (half-deleted by
    an earlier draftsmith). Returns the names removed."""
    ckpts = Path(run_dir) / "checkpoints"
    removed = []
    for leftover in sorted([*ckpts.glob(".tmp-step-*"), *ckpts.glob(".old-step-*")]):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover.name)
    found = list_checkpoints(run_dir)
    complete = [c for c in found if is_complete(c)]
    if complete:
        for ckpt in found:
            if ckpt.name < complete[-1].name and ckpt not in complete and not ckpt.is_symlink():
                remove_checkpoint(ckpt)
                removed.append(ckpt.name)
    return removed
