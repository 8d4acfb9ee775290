"""scikit-learn's 8x8 digits: the embedded default that works without any files.

1797 images of 8x8 pixels with values 0..16 (UCI "Optical Recognition of
Handwritten Digits", as bundled with scikit-learn). Split with a fixed seeded
permutation: the first 360 indices are the test split, the other 1437 train.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from prunelab._validation import check_type
from prunelab.data.dataset import Dataset
from prunelab.data.source import DatasetSource, Root

N_TEST = 360
SPLIT_SEED = 0


class DigitsSource(DatasetSource):
    name = "digits"
    description = (
        "scikit-learn's 8x8 handwritten digits (1797 images, values 0..16 scaled "
        "to [0, 1]); bundled with scikit-learn, needs no files."
    )
    folder = None
    input_shape = (1, 8, 8)
    sizes = MappingProxyType({"train": 1437, "test": N_TEST})

    def load(self, root: Root = None, download: bool = False, **options: Any) -> Dataset:
        check_type("download", download, bool, where="load_dataset")
        from sklearn.datasets import load_digits  # lazy: sklearn is slow to import

        bunch = load_digits()
        images = np.asarray(bunch.images, dtype=np.float32) / 16.0
        x = torch.from_numpy(images).unsqueeze(1).contiguous()
        y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
        test, train = perm[:N_TEST], perm[N_TEST:]
        return Dataset(
            name=self.name,
            x_train=x[train].contiguous(),
            y_train=y[train].contiguous(),
            x_test=x[test].contiguous(),
            y_test=y[test].contiguous(),
            n_classes=self.n_classes,
            class_names=list(self.class_names),
        )


DIGITS = DigitsSource()
