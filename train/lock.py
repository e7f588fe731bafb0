"""One training process per run folder: an exclusive `flock` on `<run>/.lock`, which holds the pid.

The kernel drops a flock when its process dies, however it dies, so a lock file left by a killed
run never blocks the next one: it is taken over with a notice. A clean exit empties the file.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from draftsmith.errors import DraftsmithError

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self.path.is_symlink():
            raise DraftsmithError("The run folder's lock file is a symbolic link", str(self.path),
                                  "Delete it; draftsmith creates its own")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DraftsmithError("Another draftsmith process is training into this run folder",
                                  f"{self.path.parent}: held by pid {holder}",
                                  "Wait for it to finish or stop it, or train under another run.name") from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if previous:
            print(f"[draftsmith] taking over the lock of {self.path.parent} left by pid {previous}, which is no "
                  "longer running (it ended without releasing it)", flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)     # an empty file: nothing to take over next time
        except OSError:
            pass
        os.close(self._fd)               # closing drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
