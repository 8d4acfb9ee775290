"""Files, for every room of the package: writing them safely, and :class:`ModelFileError`, the
error of a model file that cannot be read (raised by :mod:`prunelab.export`,
:mod:`prunelab.hf_load` and the command line; ``prunelab.export.ModelFileError`` is the same class).

A file is written to a new temporary file in its destination folder — a random name opened with
``O_CREAT | O_EXCL | O_NOFOLLOW``, so never a file or a symlink someone planted at a predictable
name — then fsynced and renamed onto the final name. ``os.replace`` within one folder is atomic,
so a crash or a full disk never leaves a half-written file under the final name, and a symlink
at the final name is replaced, not written through. The file gets the usual permissions (the
umask), unlike ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class ModelFileError(ValueError):
    """A model file that cannot be read: not a model file, truncated, tampered or mismatched."""


_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def exclusive_temp(path: str | os.PathLike) -> tuple[int, Path]:
    """A new temporary file next to ``path`` (same folder, so the final rename is atomic).
    Returns ``(file descriptor, temporary path)``."""
    path = Path(path)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.part")
        try:
            return os.open(tmp, _FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name next to {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a new temporary file next to ``path``, fsync it and rename it onto
    ``path``; on any failure the temporary file is removed and the error raised. Returns ``path``."""
    path = Path(path)
    fd, tmp = exclusive_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(errno.EISDIR, f"a folder is in the way: {path}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))
