"""Unpickle numpy-array pickles without ever running code named by the file.

A pickle can name any importable callable (``os.system``, ``builtins.eval``) and
have it called while loading. The CIFAR-10 "python version" batches are pickled
dicts of numpy arrays and lists, so the unpickler below resolves only the few
names needed to rebuild arrays and refuses everything else with ``ValueError``.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np


def _reconstruct():
    # numpy >= 2 moved the module to numpy._core; old pickles name numpy.core.
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct as fn
    return fn


def _frombuffer():
    # Protocol-5 pickles rebuild arrays with numpy's private _frombuffer helper.
    try:
        from numpy._core.numeric import _frombuffer as fn
    except ImportError:  # numpy 1.x
        from numpy.core.numeric import _frombuffer as fn
    return fn


def _scalar():
    try:
        from numpy._core.multiarray import scalar as fn
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar as fn
    return fn


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``codecs.encode`` limited to latin-1, the only codec numpy's pickles use."""
    if not isinstance(encoding, str) or encoding.lower().replace("-", "").replace("_", "") not in (
        "latin1",
        "iso88591",
    ):
        raise ValueError(f"refusing codec {encoding!r} in a data file")
    return codecs.encode(text, "latin1")


# (module, name) -> resolver of the object it may stand for. Nothing else is resolved.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,  # protocol-2 pickles store bytes this way
}


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose ``find_class`` only knows numpy's array rebuilders."""

    def find_class(self, module: str, name: str) -> Any:
        resolver = _ALLOWED.get((module, name))
        if resolver is None:
            raise ValueError(
                f"refusing to unpickle {module}.{name}: only numpy arrays, lists, "
                f"dicts and plain values are allowed in a data file"
            )
        return resolver()

    def persistent_load(self, pid: Any) -> Any:
        raise ValueError("refusing to unpickle a persistent id: not allowed in a data file")


def safe_loads(data: bytes, source: str = "<bytes>", *, encoding: str = "bytes") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`; errors name ``source``."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{source}: not a valid pickle ({type(exc).__name__}: {exc})") from exc


def safe_load(path: Path, *, encoding: str = "bytes") -> Any:
    return safe_loads(Path(path).read_bytes(), str(path), encoding=encoding)
