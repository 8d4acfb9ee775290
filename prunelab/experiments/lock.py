"""One ``prunelab run`` per study at a time, whatever path names the study's database.

The lock is ``fcntl.flock`` on the database file itself, so it belongs to the file's
identity (device and inode), not to the path: a symlink or a hard link to the same
``study.db`` finds the same lock. The kernel releases it when its process exits, however
it exits, so a killed study never leaves a stale lock. SQLite locks with ``fcntl`` record
locks, which are independent of ``flock`` on Linux, so the two never meet.

The holder's pid is written next to the resolved database (``<study.db>.lock``, never
followed through a symlink) for the message a second process prints; the lock itself is
the ``flock``, not that file.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path


class StudyLocked(RuntimeError):
    """Another process is running this study."""


class StudyLock:
    def __init__(self, db_path: str | Path):
        self.db_path = Path(db_path)
        self.path = Path(f"{os.path.realpath(self.db_path)}.lock")  # the holder's pid
        self._fd: int | None = None

    def __enter__(self) -> StudyLock:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.db_path, os.O_RDWR | os.O_CREAT, 0o644)  # follows links: the file itself
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"the study store {self.db_path} is not a regular file.")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StudyLocked(
                f"study {self.db_path} is already being run by {self._holder()} (the same "
                f"database file, device {info.st_dev} inode {info.st_ino}); wait for it to "
                f"finish or stop it first."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write_holder()
        return self

    def _holder(self) -> str:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return "another process"
        try:
            text = os.read(fd, 64).decode(errors="replace").strip()
        finally:
            os.close(fd)
        return f"pid {text}" if text.isdigit() else "another process"

    def _write_holder(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        except OSError:  # a planted symlink, a read-only folder: the message says less
            return
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
