"""Natural images used as backgrounds for ``mnist-back-image``.

Larochelle et al. (2007) used patches of 20 greyscale natural images that were not
published; prunelab uses whatever images are in ``<root>/backgrounds/`` (the data
folder ships the 24 Kodak test photographs ``kodim01..24.png``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prunelab.data._hashing import md5_file

FOLDER = "backgrounds"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# ITU-R BT.601 luma weights for R, G, B.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def background_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS), key=lambda p: p.name)


def to_grey(path: Path) -> np.ndarray:
    """Decode an image into float32 greyscale luma ``0.299 R + 0.587 G + 0.114 B`` in [0, 1]."""
    from PIL import Image  # lazy: only needed when backgrounds are generated

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    return (rgb @ LUMA / 255.0).astype(np.float32)


def load_backgrounds(files: list[Path]) -> list[np.ndarray]:
    return [to_grey(p) for p in files]


def fingerprint(files: list[Path]) -> dict[str, str]:
    """``{file name: md5}``: what a generated set depends on, recorded in its manifest."""
    return {p.name: md5_file(p) for p in files}
