"""A folder of ``.npy`` arrays plus a JSON manifest holding their sha256s.

Used for generated datasets: each array is written atomically, the manifest last,
so a folder whose manifest exists is complete. Loading re-hashes every file and
refuses a mismatch (a bit flip or a half-copied cache must not pass silently).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from prunelab._files import atomic_write_bytes
from prunelab.data._atomic import npy_bytes

MANIFEST = "manifest.json"


def save_arrays(folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``<key>.npy`` for each array, then ``manifest.json`` = ``meta`` + sha256s."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, array in arrays.items():
        data = npy_bytes(array)
        atomic_write_bytes(folder / f"{key}.npy", data)
        files[f"{key}.npy"] = hashlib.sha256(data).hexdigest()
    manifest = {**meta, "files": files}
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def _corrupt(folder: Path, what: str) -> ValueError:
    return ValueError(
        f"generated dataset cache {folder} is corrupt: {what}. Delete the folder "
        f"{folder} and load again to regenerate it."
    )


def load_arrays(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """``(manifest, arrays)`` from ``folder``, or ``None`` when it has no manifest.

    Raises ``ValueError`` (saying to delete the folder) when a file is missing or its
    sha256 differs from the manifest.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _corrupt(folder, f"unreadable {MANIFEST} ({exc})") from exc
    arrays = {}
    for name, expected in files.items():
        target = folder / name
        if not target.is_file():
            raise _corrupt(folder, f"{name} is missing")
        data = target.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise _corrupt(folder, f"sha256 of {name} is {actual}, the manifest says {expected}")
        arrays[name.removesuffix(".npy")] = np.load(io.BytesIO(data), allow_pickle=False)
    return manifest, arrays
