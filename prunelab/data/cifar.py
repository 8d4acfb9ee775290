"""CIFAR-10, "python version": six pickled batches in ``<root>/cifar-10-batches-py/``.

A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009;
https://www.cs.toronto.edu/~kriz/cifar.html. Each batch is a pickled dict with
``b"data"`` — (N, 3072) uint8, the 1024 red, then green, then blue values of a
32x32 image, row-major — and ``b"labels"``, a list of ints 0..9. Batches are read
with a restricted unpickler (see :mod:`prunelab.data._safe_pickle`).
"""

from __future__ import annotations

import gzip
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, cast

import numpy as np
import torch

from prunelab._validation import check_type
from prunelab.data._download import DownloadError, download_file
from prunelab.data._hashing import verify_md5
from prunelab.data._paths import find_file, writable_dir
from prunelab.data._safe_pickle import safe_load
from prunelab.data.dataset import Dataset
from prunelab.data.errors import DatasetNotFoundError
from prunelab.data.source import DatasetSource, Root, not_found_message

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

# Published md5s, as used by torchvision's CIFAR10 loader (torchvision/datasets/cifar.py:
# ``base_folder``, ``url``, ``tgz_md5``, ``train_list``, ``test_list``).
MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
# Mirrors of the archive, tried in order (module-level so tests can redirect them).
MIRRORS = ["https://www.cs.toronto.edu/~kriz/"]

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file → ``(uint8 images (N, 3, 32, 32), int64 labels (N,))``."""
    batch = safe_load(path, encoding="bytes")
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")

    def field(key: str) -> Any:
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        raise ValueError(f"{path}: the batch has no '{key}' entry")

    data = field("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    labels = np.asarray(field("labels"), dtype=np.int64)
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: 'labels' must be {len(data)} ints in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _extract(archive: Path, target: Path) -> None:
    """Extract the batches from the verified archive into ``target`` (``filter="data"``).

    Extraction goes to a temp folder next to ``target`` first; each batch is
    md5-checked and then renamed into place.
    """
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".cifar-extract-") as tmp:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.isfile() and PurePosixPath(m.name).name in MD5]
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise ValueError(
                f"{archive}: cannot extract ({type(exc).__name__}: {exc}); delete it and fetch it again"
            ) from exc
        for member in members:
            src = Path(tmp) / member.name
            verify_md5(src, MD5[src.name])
            src.replace(target / src.name)


class CifarSource(DatasetSource):
    name = "cifar10"
    description = "CIFAR-10 (Krizhevsky 2009): 32x32 colour images of 10 object classes, python pickle batches."
    folder = FOLDER
    input_shape = (3, 32, 32)
    class_names = CLASSES
    sizes = MappingProxyType({"train": 50000, "test": 10000})

    def files(self) -> list[str]:
        return [f"{FOLDER}/{b}" for b in MD5]

    def urls(self) -> list[str]:
        return [m + ARCHIVE for m in MIRRORS[:1]]

    def paths(self, root: Root, download: bool) -> dict[str, Path]:
        found = {b: find_file(f"{FOLDER}/{b}", root) for b in MD5}
        missing = [b for b, p in found.items() if p is None]
        if missing and download:
            reasons = self._download(root)
            found = {b: find_file(f"{FOLDER}/{b}", root) for b in MD5}
            missing = [b for b, p in found.items() if p is None]
        else:
            reasons = []
        if missing:
            raise DatasetNotFoundError(not_found_message(self.name, FOLDER, missing, root, reasons))
        paths = cast("dict[str, Path]", found)  # none is None: a missing file raised above
        for b, p in paths.items():
            verify_md5(p, MD5[b])
        return paths

    def _download(self, root: Root) -> list[str]:
        """Download, verify and extract the archive; return failure reasons (empty on success)."""
        target = writable_dir(FOLDER, root)
        archive = target.parent / ARCHIVE
        try:
            if not archive.is_file():
                download_file([m + ARCHIVE for m in MIRRORS], archive, ARCHIVE_MD5)
            verify_md5(archive, ARCHIVE_MD5)
        except DownloadError as exc:
            return exc.reasons or [str(exc)]
        _extract(archive, target)
        archive.unlink()  # only the batches are read; the archive is not kept
        return []

    def load(self, root: Root = None, download: bool = False, **options: Any) -> Dataset:
        check_type("download", download, bool, where="load_dataset")
        p = self.paths(root, download)
        train = [read_batch(p[b]) for b in TRAIN_BATCHES]
        x_test, y_test = read_batch(p[TEST_BATCH])
        x_train = np.concatenate([x for x, _ in train])
        y_train = np.concatenate([y for _, y in train])
        return Dataset(
            name=self.name,
            x_train=torch.from_numpy(x_train).float().div_(255.0),
            y_train=torch.from_numpy(y_train),
            x_test=torch.from_numpy(x_test).float().div_(255.0),
            y_test=torch.from_numpy(y_test),
            n_classes=self.n_classes,
            class_names=list(self.class_names),
        )

    def fetch(self, root: Root = None) -> list[Path]:
        return list(self.paths(root, download=True).values())


CIFAR10 = CifarSource()
