"""Small builders shared by test files (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import gzip

import numpy as np
import torch
from torch import nn


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


class Conv1D(nn.Module):
    """Hugging Face's Conv1D layout (weight ``(in, out)``, ``z = x W + b``), recognised by its
    class name and ``nf``: weight ``randn(nx, nf) · scale``, bias zero."""

    def __init__(self, nf: int, nx: int, scale: float = 1.0):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * scale)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def rewrite_header(path, edit) -> None:
    """The model file at ``path`` with its header changed by ``edit`` and the checksum
    recomputed: a crafted file that passes the integrity check."""
    import hashlib
    import struct

    from prunelab import export

    header, payload = export._read(path)
    edit(header)
    core = export._header_bytes(header)
    header["sha256"] = hashlib.sha256(core + payload).hexdigest()
    head = export._header_bytes(header)
    path.write_bytes(export.MAGIC + struct.pack("<BI", export.VERSION, len(head)) + head + payload)
