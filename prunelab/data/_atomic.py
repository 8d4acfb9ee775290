"""The ``.npy`` bytes of an array, for the data room's caches (written with
:func:`prunelab._files.atomic_write_bytes`)."""

from __future__ import annotations

import io

import numpy as np


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` serialisation of ``array`` (no pickling)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
