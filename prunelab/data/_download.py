"""Download one file from a list of mirrors, verified by checksum, written atomically.

The bytes are streamed into a temp file in the destination folder while their checksum
(md5 by default, or sha256) is computed; only a file whose checksum matches is renamed
onto its final name, so a failed, interrupted or tampered download never leaves a file
that looks valid.
Mirrors are tried in order; the next one is used when one fails for any reason.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from prunelab.data.errors import ChecksumError

DEFAULT_TIMEOUT = 30.0  # seconds without data before a mirror is given up
_CHUNK = 1 << 16


class DownloadError(OSError):
    """Every mirror failed (network errors, HTTP errors); ``reasons`` says why, per URL."""

    def __init__(self, message: str, reasons: Sequence[str]):
        super().__init__(message)
        self.reasons = list(reasons)


def _progress_bar(total: int | None, name: str, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm  # imported lazily: only needed for interactive downloads

    return tqdm(total=total, unit="B", unit_scale=True, desc=name, leave=False)


def _fetch_one(url: str, dest: Path, timeout: float, progress: bool | None, algorithm: str = "md5") -> tuple[str, str]:
    """Stream ``url`` into a temp file next to ``dest``; return (temp path, hex digest)."""
    request = urllib.request.Request(url, headers={"User-Agent": "prunelab"})
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.new(algorithm)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            bar = _progress_bar(int(length) if length and length.isdigit() else None, dest.name, progress)
            try:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp, digest.hexdigest()


def download_file(
    urls: Sequence[str],
    dest: Path,
    checksum: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool | None = None,
    algorithm: str = "md5",
) -> Path:
    """Download ``dest`` from the first of ``urls`` that serves bytes with checksum ``checksum``
    (the hex digest of ``algorithm``: ``"md5"``, or ``"sha256"`` for files published with one).

    Raises :class:`ChecksumError` when no mirror succeeded and at least one served
    wrong bytes, else :class:`DownloadError` listing each mirror's failure.
    ``progress``: ``None`` shows a tqdm bar only when stderr is a terminal.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    reasons: list[str] = []
    bad_checksum = False
    for url in urls:
        try:
            tmp, actual = _fetch_one(url, dest, timeout, progress, algorithm)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                reasons.append(f"{url}: HTTP {exc.code} {exc.reason}")
            else:
                reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
                reasons.append(f"{url}: {type(exc).__name__}: {reason}")
            continue
        if actual != checksum:
            os.unlink(tmp)
            bad_checksum = True
            reasons.append(f"{url}: checksum mismatch: expected {algorithm} {checksum}, got {actual}")
            continue
        os.replace(tmp, dest)
        return dest
    detail = "\n  ".join(reasons) if reasons else "no mirror configured"
    if bad_checksum:
        raise ChecksumError(
            f"checksum mismatch for {dest.name}: no mirror served the expected "
            f"bytes ({algorithm} {checksum}); nothing was saved.\n  {detail}"
        )
    raise DownloadError(f"could not download {dest.name}:\n  {detail}", reasons)
