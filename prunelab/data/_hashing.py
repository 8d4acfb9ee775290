"""Streaming file checksums (md5 for published files, sha256 for our own caches)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from prunelab.data.errors import ChecksumError

_CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of the file at ``path`` (read in 1 MiB chunks)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def md5_file(path: Path) -> str:
    return file_digest(path, "md5")


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def verify_md5(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` naming the file and both md5s unless they match."""
    verify_checksum(path, expected, "md5")


def verify_checksum(path: Path, expected: str, algorithm: str) -> None:
    """Raise :class:`ChecksumError` naming the file and both digests unless they match."""
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for {path}: expected {algorithm} {expected}, got {actual}. "
            f"The file is corrupt, truncated or not the published one; delete it and "
            f"fetch it again."
        )
