"""Core data API: registry names, errors, roots, digits and the Dataset helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunelab.data import (
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    cache_dir,
    data_root,
    dataset_info,
    fetch,
    load_dataset,
)

pytestmark = pytest.mark.usefixtures("isolated_data")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def tiny(n_train=10, n_test=4, channels=1, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(
        name="tiny",
        x_train=torch.rand(n_train, channels, 3, 3, generator=g),
        y_train=torch.arange(n_train) % 3,
        x_test=torch.rand(n_test, channels, 3, 3, generator=g),
        y_test=torch.arange(n_test) % 3,
        n_classes=3,
        class_names=["a", "b", "c"],
    )


# -- registry and errors ---------------------------------------------------------
def test_registered_names():
    assert DATASETS.names() == sorted(
        [
            "digits",
            "mnist",
            "fashion-mnist",
            "mnist-rot",
            "mnist-back-rand",
            "mnist-back-image",
            "cifar10",
            "pydocs",
            "ptb",
            "wikitext-2",
        ]
    )


def test_unknown_name_suggests_close_one():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnsit' \(did you mean 'mnist'\?\)") as e:
        load_dataset("mnsit")
    assert "must be one of: cifar10, digits" in str(e.value)


def test_name_must_be_a_string():
    with pytest.raises(TypeError, match="dataset name"):
        load_dataset(3)


def test_unknown_option_is_a_type_error_listing_valid_ones():
    with pytest.raises(TypeError, match=r"'sed'.*'mnist-rot'.*seed, swap, source"):
        load_dataset("mnist-rot", sed=1)
    with pytest.raises(TypeError, match=r"'swap'.*'mnist'.*none"):
        load_dataset("mnist", swap=True)


def test_bad_root_and_download_types():
    with pytest.raises(TypeError, match="'root' parameter of load_dataset"):
        load_dataset("digits", root=3)
    with pytest.raises(TypeError, match="'download' parameter of load_dataset"):
        load_dataset("digits", download="yes")


def test_dataset_not_found_is_a_file_not_found_error():
    assert issubclass(DatasetNotFoundError, FileNotFoundError)


# -- roots -------------------------------------------------------------------------
def test_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"  # argument wins
    assert data_root(str(tmp_path / "arg")) == tmp_path / "arg"
    assert data_root() == tmp_path / "env"  # then the env variable
    monkeypatch.setenv("PRUNELAB_DATA", "")  # empty = unset
    assert data_root() == tmp_path / "c"  # then the cache dir
    monkeypatch.delenv("PRUNELAB_DATA")
    assert data_root() == cache_dir() == tmp_path / "c"


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.setenv("PRUNELAB_CACHE", "")
    assert cache_dir() == tmp_path / "xdg" / "prunelab"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "prunelab"


def test_data_root_rejects_non_path():
    with pytest.raises(TypeError, match="'root' parameter of data_root"):
        data_root(1.5)


# -- digits ------------------------------------------------------------------------
def test_digits_shapes_dtypes_ranges(digits):
    assert digits.name == "digits" and digits.n_classes == 10
    assert digits.class_names == [str(i) for i in range(10)]
    assert digits.input_shape == (1, 8, 8)
    assert digits.x_train.shape == (1437, 1, 8, 8) and digits.x_test.shape == (360, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.x_train.min() >= 0 and digits.x_train.max() == 1.0
    assert set(digits.y_train.tolist()) == set(range(10)) == set(digits.y_test.tolist())
    assert digits.val is None and digits.x_val is None
    x, y = digits.train
    assert x is digits.x_train and y is digits.y_train


def test_digits_is_deterministic_and_ignores_root(digits, tmp_path):
    again = load_dataset("digits", root=tmp_path / "nowhere")
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    assert not (tmp_path / "nowhere").exists()


def test_digits_info_and_fetch():
    info = dataset_info("digits")
    assert info["input_shape"] == (1, 8, 8) and info["sizes"] == {"train": 1437, "test": 360}
    assert info["files"] == [] and info["n_classes"] == 10
    assert fetch("digits") == []


def test_info_of_a_file_dataset_names_files_and_location(tmp_path):
    info = dataset_info("mnist", root=tmp_path)
    assert info["location"] == str(tmp_path / "mnist")
    assert "mnist/train-images-idx3-ubyte.gz" in info["files"] and len(info["files"]) == 4
    assert info["sizes"] == {"train": 60000, "test": 10000}
    assert info["download"][0].startswith("https://ossci-datasets.s3.amazonaws.com/mnist/")
    assert dataset_info("cifar10")["input_shape"] == (3, 32, 32)


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_has_complete_info(name):
    info = dataset_info(name)
    assert info["name"] == name and info["description"]
    if name in ("pydocs", "ptb", "wikitext-2"):  # text: token sequences over a vocabulary
        assert info["input_shape"] == (128,) and info["n_classes"] == 8192 and info["class_names"] == []
        assert set(info["sizes"]) == {"train", "valid", "test"}
        return
    assert len(info["input_shape"]) == 3 and info["n_classes"] == len(info["class_names"]) == 10
    assert set(info["sizes"]) == {"train", "test"}


# -- Dataset -----------------------------------------------------------------------
def test_dataset_is_frozen_and_validates():
    ds = tiny()
    with pytest.raises(AttributeError):
        ds.name = "x"
    with pytest.raises(ValueError, match="float32"):
        Dataset("bad", ds.x_train.double(), ds.y_train, ds.x_test, ds.y_test, 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="int64"):
        Dataset("bad", ds.x_train, ds.y_train.int(), ds.x_test, ds.y_test, 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match="class names"):
        Dataset("bad", ds.x_train, ds.y_train, ds.x_test, ds.y_test, 3, ["a"])
    with pytest.raises(ValueError, match="together"):
        Dataset("bad", ds.x_train, ds.y_train, ds.x_test, ds.y_test, 3, ["a", "b", "c"], x_val=ds.x_test)
    assert "train=10" in repr(ds)


def test_with_validation_count_and_fraction(digits):
    ds = digits.with_validation(200, seed=1)
    assert len(ds.x_val) == 200 and len(ds.x_train) == 1237 and ds.val is not None
    assert ds.y_val.dtype == torch.int64
    # The two parts partition the original train split (rows compared as a multiset).
    both = torch.cat([ds.x_train, ds.x_val]).flatten(1)
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(both) == key(digits.x_train.flatten(1))
    assert torch.equal(ds.x_test, digits.x_test)
    again = digits.with_validation(200, seed=1)
    assert torch.equal(again.x_val, ds.x_val)
    other = digits.with_validation(200, seed=2)
    assert not torch.equal(other.x_val, ds.x_val)
    frac = digits.with_validation(0.1)
    assert len(frac.x_val) == round(0.1 * 1437)
    assert digits.x_val is None  # the original is untouched


@pytest.mark.parametrize(
    "size, error",
    [(0, ValueError), (1437, ValueError), (1.0, ValueError), (0.0, ValueError), (True, TypeError), ("10", TypeError)],
)
def test_with_validation_rejects_bad_sizes(digits, size, error):
    with pytest.raises(error, match="'size' parameter of Dataset.with_validation"):
        digits.with_validation(size)


def test_with_validation_twice_is_an_error():
    with pytest.raises(ValueError, match="already has a validation split"):
        tiny().with_validation(2).with_validation(2)


def test_subset(digits):
    small = digits.subset(n_train=100, n_test=50, seed=3)
    assert small.x_train.shape == (100, 1, 8, 8) and len(small.y_test) == 50
    assert torch.equal(small.x_train, digits.subset(100, 50, seed=3).x_train)
    assert not torch.equal(small.x_train, digits.subset(100, 50, seed=4).x_train)
    # Every kept example is an original one.
    rows = {tuple(r) for r in digits.x_train.flatten(1).tolist()}
    assert all(tuple(r) in rows for r in small.x_train.flatten(1).tolist())
    assert len(digits.subset(n_test=10).x_train) == 1437
    with pytest.raises(ValueError, match="'n_train' parameter of Dataset.subset"):
        digits.subset(n_train=5000)
    with pytest.raises(ValueError, match="validation split"):
        digits.subset(n_val=3)
    with_val = digits.with_validation(100).subset(n_val=10)
    assert len(with_val.x_val) == 10


def test_standardized_uses_train_stats_per_channel():
    ds = tiny(n_train=50, channels=3)
    ds = Dataset(
        ds.name,
        ds.x_train * torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1) + 0.5,
        ds.y_train,
        ds.x_test,
        ds.y_test,
        3,
        ds.class_names,
    )
    st = ds.standardized()
    mean = st.x_train[:, :2].mean(dim=(0, 2, 3))
    std = st.x_train[:, :2].std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(2), atol=1e-5)
    assert torch.allclose(std, torch.ones(2), atol=1e-4)
    assert torch.isfinite(st.x_train).all()  # constant channel: std taken as 1
    m, s = ds.train_stats()
    assert m.shape == s.shape == (3,)
    assert torch.allclose(st.x_test, (ds.x_test - m.view(1, 3, 1, 1)) / s.view(1, 3, 1, 1))
    assert torch.equal(st.y_train, ds.y_train)


def test_no_writes_outside_tmp(digits, tmp_path):
    # Loading the embedded dataset creates nothing, not even the cache dir.
    assert not Path(cache_dir()).exists()
