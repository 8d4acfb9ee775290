"""The real MNIST / Fashion-MNIST files (marked ``data``; skipped when they are absent).

Reads from ``$PRUNELAB_DATA``, else ``/work/shared/data`` when that folder exists.
Anything generated goes to a tmp cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from prunelab.data import load_dataset
from prunelab.data._paths import is_writable
from prunelab.data.mnist import MD5

pytestmark = pytest.mark.data

# the shared data folder that sits beside a checkout (../shared/data), as in CI
_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = Path(os.environ["PRUNELAB_DATA"]) if os.environ.get("PRUNELAB_DATA") else _SHARED

# Per-class counts of the official splits (measured on the files; the same values the
# MNIST and Fashion-MNIST pages report: Fashion-MNIST is balanced, 6000/1000 per class).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def require(name: str) -> Path:
    missing = [f for f in MD5[name] if not (DATA / name / f).is_file()]
    if missing:
        pytest.skip(
            f"real {name} files absent from {DATA / name} ({', '.join(missing)}); "
            f"set PRUNELAB_DATA to a folder holding them"
        )
    return DATA


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PRUNELAB_DATA", raising=False)


@pytest.mark.parametrize(
    "name, train_counts, test_counts",
    [
        ("mnist", MNIST_TRAIN_COUNTS, MNIST_TEST_COUNTS),
        ("fashion-mnist", [6000] * 10, [1000] * 10),
    ],
)
def test_real_idx_datasets(name, train_counts, test_counts):
    root = require(name)
    ds = load_dataset(name, root=root)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert 0.0 == ds.x_train.min() and ds.x_train.max() == 1.0
    assert ds.y_train.bincount(minlength=10).tolist() == train_counts
    assert ds.y_test.bincount(minlength=10).tolist() == test_counts
    assert sum(train_counts) == 60000 and sum(test_counts) == 10000


def test_real_generated_back_rand(tmp_path, monkeypatch):
    root = require("mnist")
    monkeypatch.setenv("PRUNELAB_DATA", str(root))
    before = sorted(os.listdir(root))
    ds = load_dataset("mnist-back-rand")
    assert ds.x_train.shape == (12000, 1, 28, 28) and ds.x_test.shape == (50000, 1, 28, 28)
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1
    assert int(ds.y_train.bincount().sum()) == 12000 and int(ds.y_test.bincount().sum()) == 50000
    manifest = tmp_path / "cache" / "mnist-back-rand" / "generated-v1-seed0" / "manifest.json"
    if not is_writable(root):  # e.g. the read-only shared folder
        assert manifest.is_file() and sorted(os.listdir(root)) == before
    again = load_dataset("mnist-back-rand")
    assert torch.equal(again.x_test, ds.x_test)
