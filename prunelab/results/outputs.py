"""Writing a study's outputs (tables, figures, the report) safely.

Each file is written to a new temporary file in its folder (a random name, created with
``O_EXCL | O_NOFOLLOW``) and renamed into place, so a full disk or a crash never leaves a
half-written table or figure under the final name, and a file or symlink planted at a
predictable name is never written through. A
failure is raised as :class:`~prunelab.store.StudyWriteError` naming the file;
outputs only read the store, so the stored runs are never affected.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from prunelab._files import exclusive_temp
from prunelab.store import write_failure

ADVICE = (
    "the stored runs are unaffected; free space or choose another folder (--out), then write "
    "the outputs again (prunelab table | plot | report STUDY.db)"
)


def default_output_folder(store_path: str | Path, kind: str) -> Path:
    """Where a store's ``kind`` outputs (``tables`` or ``figures``) go when no folder is given:
    ``tables/`` beside a store named ``study.db`` (the layout ``prunelab run`` makes,
    ``results/<name>/study.db``), ``<db stem>_tables/`` beside any other store, so two stores
    in one folder never overwrite each other's outputs."""
    store_path = Path(store_path)
    return store_path.with_name(kind if store_path.name == "study.db" else f"{store_path.stem}_{kind}")


def output_folder(folder: str | Path) -> Path:
    """Create ``folder`` (and its parents) for outputs; return it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failure("create the output folder", folder, err, ADVICE) from err
    return folder


def write_output(path: str | Path, content: str | bytes) -> Path:
    """Write one output file atomically (text as UTF-8); return its path. A symlink planted at
    the final name is replaced, never written through."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    tmp = None
    try:
        fd, tmp = exclusive_temp(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(errno.EISDIR, "a folder is in the way")
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise write_failure("write", path, err, ADVICE) from err
    return path
