"""MNIST and Fashion-MNIST: four gzip-compressed IDX files each, md5-verified on every load."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from prunelab._validation import check_type
from prunelab.data.dataset import Dataset
from prunelab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from prunelab.data.source import DatasetSource, Root, ensure_files

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"

# md5 of each .gz as published (the same values as torchvision's MNIST/FashionMNIST
# resources and the data folder's MD5SUMS). Tests patch these for synthetic files.
MD5 = {
    "mnist": {
        TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
        TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
        TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
        TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
        TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# Download mirrors, tried in order (each URL + file name). A module-level table so
# tests (and users behind a proxy) can point it elsewhere.
MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ],
}

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _check_pair(images: np.ndarray, labels: np.ndarray, source: str) -> None:
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{source}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{source}: {len(labels)} labels for {len(images)} images")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{source}: labels must be 0..9, found {int(labels.max())}")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` → float32 ``(N, 1, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).float().div_(255.0)


class IdxSource(DatasetSource):
    """A dataset stored as the four MNIST-style IDX files in ``<root>/<name>/``."""

    input_shape = (1, 28, 28)
    sizes = MappingProxyType({"train": 60000, "test": 10000})

    folder: str  # set in __init__

    def __init__(self, name: str, description: str, class_names: tuple[str, ...]):
        self.name = name
        self.folder = name
        self.description = description
        self.class_names = class_names

    def files(self) -> list[str]:
        return [f"{self.folder}/{f}" for f in MD5[self.name]]

    def urls(self) -> list[str]:
        return [MIRRORS[self.name][0] + f for f in MD5[self.name]] if MIRRORS[self.name] else []

    def paths(self, root: Root, download: bool) -> dict[str, Path]:
        return ensure_files(self.name, self.folder, MD5[self.name], MIRRORS[self.name], root, download)

    def arrays(self, root: Root = None, download: bool = False) -> dict[str, np.ndarray]:
        """The raw uint8 arrays: ``x_train, y_train, x_test, y_test`` (images ``(N, 28, 28)``)."""
        p = self.paths(root, download)
        out = {
            "x_train": read_idx(p[TRAIN_IMAGES], magic=IMAGES_MAGIC),
            "y_train": read_idx(p[TRAIN_LABELS], magic=LABELS_MAGIC),
            "x_test": read_idx(p[TEST_IMAGES], magic=IMAGES_MAGIC),
            "y_test": read_idx(p[TEST_LABELS], magic=LABELS_MAGIC),
        }
        _check_pair(out["x_train"], out["y_train"], str(p[TRAIN_IMAGES].parent))
        _check_pair(out["x_test"], out["y_test"], str(p[TEST_IMAGES].parent))
        return out

    def load(self, root: Root = None, download: bool = False, **options: Any) -> Dataset:
        check_type("download", download, bool, where="load_dataset")
        a = self.arrays(root, download)
        return Dataset(
            name=self.name,
            x_train=to_tensor(a["x_train"]),
            y_train=torch.from_numpy(a["y_train"].astype(np.int64)),
            x_test=to_tensor(a["x_test"]),
            y_test=torch.from_numpy(a["y_test"].astype(np.int64)),
            n_classes=self.n_classes,
            class_names=list(self.class_names),
        )

    def fetch(self, root: Root = None) -> list[Path]:
        return list(self.paths(root, download=True).values())


MNIST = IdxSource(
    "mnist",
    "MNIST handwritten digits (LeCun et al. 1998): 28x28 greyscale, 10 classes.",
    tuple(str(i) for i in range(10)),
)

FASHION_MNIST = IdxSource(
    "fashion-mnist",
    "Fashion-MNIST (Xiao et al. 2017): 28x28 greyscale Zalando article images, 10 classes.",
    FASHION_CLASSES,
)
