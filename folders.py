"""Output folders draftsmith writes, and the one rule for replacing them.

Every folder draftsmith creates (a run, an export, an eval report, prepared data) carries a marker
file, `.draftsmith`, saying what wrote it. `--overwrite` replaces only a folder with a marker of the
same kind, so it can never delete a folder draftsmith did not write, a run by exporting over it,
the working directory, or any parent of a folder the command still needs.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from draftsmith.errors import DraftsmithError

MARKER = ".draftsmith"
KINDS = {"run": "a training run", "export": "an export", "eval": "an eval report", "data": "prepared data",
         "regenerated": "regenerated conversations", "cache": "a teacher cache"}


def write_marker(folder: Path, kind: str) -> None:
    from draftsmith import __version__

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    marker = {"written_by": "draftsmith", "kind": kind, "version": __version__, "time": stamp}
    (Path(folder) / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def marker_kind(folder: Path) -> str | None:
    """The kind named by the folder's marker; None when it has no valid one (a symlink does not count)."""
    path = Path(folder) / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != "draftsmith":
        return None
    return marker.get("kind")


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_folder(path: str | Path, overwrite: bool, kind: str, protect=(), option: str = "--out",
                        other: str | None = None) -> Path:
    """Refuse an output folder this command must not write; called before any work starts.

    A symlink or a file is refused. An existing non-empty folder needs `overwrite`, and then it must carry a
    marker of `kind` and be neither the working directory, nor a parent of it, nor one of `protect` (the
    folders the command reads, e.g. the run being exported) or a parent of one."""
    path, other = Path(path), other or f"Pick another {option}"
    if path.is_symlink():
        raise DraftsmithError(f"{option} is a symbolic link; draftsmith writes only into real folders",
                              f"{path} -> {os.readlink(path)}", f"Pass the folder it points to. {other}")
    if path.exists() and not path.is_dir():
        raise DraftsmithError(f"{option} is a file, not a folder", str(path), other)
    if not path.is_dir():
        return path
    # an output folder is replaced whole when the command ends: never the working directory, a folder
    # the command reads, or a parent of one -- even an empty working directory cannot be replaced
    real = path.resolve()
    for keep, why in [(Path.cwd(), "the working directory"), *((Path(p), "a folder this command reads") for p in protect)]:
        if _is_within(keep.resolve(), real):
            where = "is" if keep.resolve() == real else "holds"
            raise DraftsmithError(f"draftsmith will not write {option} there: it {where} {why}",
                                  f"{path} (resolves to {real}; {why}: {keep})", other)
    if not any(path.iterdir()):
        return path
    if not overwrite:
        raise DraftsmithError(f"{option} is a folder that is not empty", str(path),
                              f"{other}, or pass --overwrite to replace {KINDS[kind]} draftsmith wrote there")
    found = marker_kind(path)
    if found is None:
        raise DraftsmithError(f"--overwrite replaces only folders draftsmith wrote, and {option} has no {MARKER} marker",
                              str(path), f"{other}, or delete the folder yourself if it is yours to delete "
                              "(folders written before draftsmith had markers have none)")
    if found != kind:
        raise DraftsmithError(f"--overwrite refuses to replace {KINDS.get(found, found)} with {KINDS[kind]}",
                              f"{path} (its marker says {found!r})", other)
    return path


def prepare_output_folder(path: str | Path, overwrite: bool, kind: str, protect=(), option: str = "--out") -> Path:
    """`check_output_folder`, then an empty folder with a marker of `kind` (an allowed old one is deleted)."""
    path = check_output_folder(path, overwrite, kind, protect, option)
    if path.is_dir() and any(path.iterdir()):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path, kind)
    return path


def replace_folder(tmp: Path, out: Path) -> None:
    """Move a finished folder built beside `out` into its place (`out` passed check_output_folder)."""
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        raise DraftsmithError("The output appeared while draftsmith was writing it, and it is not a folder",
                              str(out), "Remove it, or pick another --out")
    tmp.rename(out)


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (checkpoints and teacher-cache shards are checked by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def disk_full_error(err: OSError, what: str, where: Path, fix: str) -> DraftsmithError | None:
    """A full disk (ENOSPC, or a quota: EDQUOT) said in words: what could not be written, the file, and the
    bytes free where it was going; None for any other OSError (the caller re-raises that as it is)."""
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    near = Path(where).absolute()
    while not near.exists() and near != near.parent:   # the nearest folder that exists (a temporary one may be gone)
        near = near.parent
    return DraftsmithError(f"The disk is full: {what}", f"{err.filename or where}: {shutil.disk_usage(near).free} "
                           "bytes free", fix)


@contextlib.contextmanager
def disk_full_said(what: str, where: Path, fix: str):
    """Inside the block, a full disk becomes `disk_full_error`'s DraftsmithError; other errors pass unchanged."""
    try:
        yield
    except OSError as err:
        said = disk_full_error(err, what, where, fix)
        if said is None:
            raise
        raise said from None
