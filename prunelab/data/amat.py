"""``.amat`` text files of the MNIST variants of Larochelle et al. (ICML 2007).

One example per line, 785 whitespace-separated numbers: 784 pixel intensities in
[0, 1], then the class label 0-9 written as a float. In the rotation and
background variants the 784 values are stored column-major, so each image is
``reshape(28, 28).T`` (as reported by public loaders; see the data README).
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

N_PIXELS = 28 * 28
N_COLUMNS = N_PIXELS + 1


def parse_amat(text: str | bytes, source: str = "<text>", *, transpose: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``.amat`` text into ``(images float32 (N, 28, 28), labels int64 (N,))``.

    Vectorised: the whole text goes through one ``np.fromstring`` call. Raises
    ``ValueError`` naming ``source`` when a row does not have 785 columns, a token is
    not a number, a label is not an integer in 0..9 or a pixel is outside [0, 1].
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    text = text.strip()
    if not text:
        raise ValueError(f"{source}: empty .amat file")
    n_rows = text.count("\n") + 1  # counting avoids one Python string per row
    first = len(text[: text.find("\n") if n_rows > 1 else None].split())
    if first != N_COLUMNS:
        raise ValueError(f"{source}: expected {N_COLUMNS} columns (784 pixels + label), the first row has {first}")
    try:
        values = np.fromstring(text, dtype=np.float64, sep=" ")
    except ValueError as exc:
        raise ValueError(f"{source}: not a numeric .amat file ({exc})") from exc
    if values.size != n_rows * N_COLUMNS:
        raise ValueError(
            f"{source}: {values.size} numbers in {n_rows} rows, not "
            f"{N_COLUMNS} per row; some rows have the wrong number of columns"
        )
    table = values.reshape(n_rows, N_COLUMNS)
    pixels, raw_labels = table[:, :N_PIXELS], table[:, N_PIXELS]
    labels = raw_labels.astype(np.int64)
    bad = (labels != raw_labels) | (labels < 0) | (labels > 9)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{source}: row {row + 1} has label {float(raw_labels[row]):g}; labels must be integers 0..9")
    if not np.isfinite(pixels).all() or pixels.min() < 0.0 or pixels.max() > 1.0:
        raise ValueError(
            f"{source}: pixel values must lie in [0, 1]; found range [{np.nanmin(pixels):g}, {np.nanmax(pixels):g}]"
        )
    images = pixels.astype(np.float32).reshape(n_rows, 28, 28)
    if transpose:
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    return images, labels


def read_amat(path: Path, *, transpose: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Parse the ``.amat`` file at ``path``."""
    return parse_amat(Path(path).read_bytes(), str(path), transpose=transpose)


def read_amat_from_zip(archive: Path, member: str, *, transpose: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Parse the member of ``archive`` whose base name is ``member`` (any folder inside)."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if PurePosixPath(info.filename).name == member:
                return parse_amat(zf.read(info), f"{archive}:{info.filename}", transpose=transpose)
    raise ValueError(f"{archive}: no member named {member}")


def zip_members(archive: Path) -> set[str]:
    """Base names of the files inside ``archive``; a corrupt archive is a ``ValueError``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return {PurePosixPath(n).name for n in zf.namelist()}
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{archive}: corrupt or truncated zip file ({exc}); delete it and fetch it again") from exc
