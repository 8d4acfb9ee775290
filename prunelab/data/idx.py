"""IDX files, the format of MNIST and Fashion-MNIST (optionally gzip-compressed).

Format (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS FOR THE MNIST DATABASE"):
a 4-byte magic number — two zero bytes, a type code, the number of dimensions —
then one big-endian uint32 per dimension, then the values, row-major. MNIST image
files have magic 2051 (0x00000803: uint8, 3 dims), label files 2049 (0x00000801:
uint8, 1 dim).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# IDX type code -> numpy dtype (multi-byte values are big-endian).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, source: str = "<bytes>", *, magic: int | None = None) -> np.ndarray:
    """Decode an uncompressed IDX payload into an array of the stored shape.

    ``magic``, when given, is the magic number the file must have (e.g. 2051).
    Raises ``ValueError`` naming ``source`` when the header is malformed or the
    payload size disagrees with the header.
    """
    if len(data) < 4:
        raise ValueError(f"{source}: not an IDX file: {len(data)} bytes, shorter than the 4-byte magic number")
    found = int.from_bytes(data[:4], "big")
    if magic is not None and found != magic:
        raise ValueError(
            f"{source}: wrong IDX magic number {found} (expected {magic}); this is not the right file or it is corrupt"
        )
    if data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{source}: not an IDX file: bad magic number {found} (bytes {data[:4].hex()})")
    dtype, ndim = _DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{source}: truncated IDX header: {ndim} dimensions need {header} bytes, the file has {len(data)}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        raise ValueError(
            f"{source}: IDX payload is {actual} bytes but the header's shape "
            f"{shape} needs {expected}; the file is truncated or corrupt"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def read_gzip(path: Path) -> bytes:
    """Decompress a whole ``.gz`` file; a corrupt or truncated one gives a ``ValueError``."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(
            f"{path}: corrupt or truncated gzip file ({type(exc).__name__}: {exc}); delete it and fetch it again"
        ) from exc


def read_idx(path: Path, *, magic: int | None = None) -> np.ndarray:
    """Read an IDX file, gunzipping it when its name ends in ``.gz``."""
    path = Path(path)
    data = read_gzip(path) if path.suffix == ".gz" else path.read_bytes()
    return parse_idx(data, str(path), magic=magic)
