"""One ``prunelab run`` per study at a time: an advisory lock next to the database.

The lock (``fcntl.flock`` on ``<db>.lock``) is released by the kernel when its
process exits, however it exits, so a killed study never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class StudyLocked(RuntimeError):
    """Another process is running this study."""


class StudyLock:
    def __init__(self, db_path: str | Path):
        self.path = Path(f"{db_path}.lock")
        self._fd: int | None = None

    def __enter__(self) -> "StudyLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StudyLocked(f"study {self.path.with_suffix('')} is already being run by pid {holder}; "
                              f"wait for it to finish or stop it first.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
