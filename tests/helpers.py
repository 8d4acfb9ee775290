"""Small builders shared by test files (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import gzip

import numpy as np


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An uncompressed IDX file: big-endian magic and dims, then the uint8 payload."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def idx_gz(array: np.ndarray, magic: int) -> bytes:
    """The same, gzip-compressed reproducibly (mtime 0)."""
    return gzip.compress(idx_bytes(array, magic), mtime=0)


#: Registry models that take token ids (N, T) and return logits (N, T, vocabulary): their
#: ``input_shape`` is ``(T,)`` and ``n_classes`` the vocabulary.
LANGUAGE_MODELS = ("gpt", "lstm-lm")
