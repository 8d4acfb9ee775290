"""File formats: IDX (+gzip), .amat (+zip), and the restricted unpickler with CIFAR-10."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from helpers import idx_bytes

from prunelab.data import DatasetNotFoundError, cifar, load_dataset
from prunelab.data._safe_pickle import safe_loads
from prunelab.data.amat import parse_amat, read_amat
from prunelab.data.idx import parse_idx, read_idx
from prunelab.data.variants import ORIGINAL_FILES

pytestmark = pytest.mark.usefixtures("isolated_data")


# -- IDX ---------------------------------------------------------------------------
def test_idx_gz_images_and_labels_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "im.gz").write_bytes(gzip.compress(idx_bytes(images, 2051)))
    (tmp_path / "lb.gz").write_bytes(gzip.compress(idx_bytes(labels, 2049)))
    got = read_idx(tmp_path / "im.gz", magic=2051)
    assert got.dtype == np.uint8 and np.array_equal(got, images) and got.flags.writeable
    assert np.array_equal(read_idx(tmp_path / "lb.gz", magic=2049), labels)


def test_idx_big_endian_int32_payload():
    values = np.array([[1, -2], [70000, 4]], dtype=">i4")
    data = bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") * 2 + values.tobytes()
    assert parse_idx(data).tolist() == [[1, -2], [70000, 4]]


def test_idx_wrong_magic_names_file():
    data = idx_bytes(np.zeros(3, np.uint8), 2049)
    with pytest.raises(ValueError, match=r"labels\.idx: wrong IDX magic number 2049 \(expected 2051\)"):
        parse_idx(data, "labels.idx", magic=2051)
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"\x12\x34\x08\x01" + bytes(8), "x")


def test_idx_truncated_payload_and_header():
    data = idx_bytes(np.zeros((4, 28, 28), np.uint8), 2051)
    with pytest.raises(
        ValueError,
        match=r"f\.idx: IDX payload is 3035 bytes but the header's "
        r"shape \(4, 28, 28\) needs 3136",
    ):
        parse_idx(data[:-101], "f.idx", magic=2051)
    with pytest.raises(ValueError, match="truncated IDX header"):
        parse_idx(data[:10], "f.idx")


def test_truncated_and_corrupt_gzip_name_the_file(tmp_path):
    full = gzip.compress(idx_bytes(np.zeros((20, 28, 28), np.uint8), 2051))
    (tmp_path / "cut.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt or truncated gzip file \(EOFError"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "junk.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match=r"junk\.gz: corrupt or truncated gzip.*fetch it again"):
        read_idx(tmp_path / "junk.gz")


# -- .amat -------------------------------------------------------------------------
def amat_text(pixels: np.ndarray, labels) -> str:
    rows = [" ".join(f"{v:.6e}" for v in row) + f" {float(lab):.18e}" for row, lab in zip(pixels, labels)]
    return "\n".join(rows) + "\n"


def test_amat_parse_and_transpose(tmp_path):
    pixels = np.zeros((3, 784))
    pixels[0, 1] = 1.0  # column-major storage: value 1 is row 1, column 0
    pixels[1, 28] = 0.5  # value 28 is row 0, column 1
    pixels[2] = np.linspace(0, 1, 784)
    (tmp_path / "x.amat").write_text(amat_text(pixels, [7, 0, 9]))
    images, labels = read_amat(tmp_path / "x.amat")
    assert images.shape == (3, 28, 28) and images.dtype == np.float32
    assert labels.tolist() == [7, 0, 9] and labels.dtype == np.int64
    assert images[0, 1, 0] == 1.0 and images[0].sum() == 1.0
    assert images[1, 0, 1] == 0.5
    plain, _ = parse_amat(amat_text(pixels, [7, 0, 9]), transpose=False)
    assert plain[0, 0, 1] == 1.0
    assert np.allclose(images, plain.transpose(0, 2, 1))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p, l: (p[:, :-1], l), "expected 785 columns"),
        (lambda p, l: (p, [10, 0]), "row 1 has label 10; labels must be integers 0..9"),
        (lambda p, l: (p, [2.5, 0]), "row 1 has label 2.5"),
        (lambda p, l: (p + 1.5, l), r"pixel values must lie in \[0, 1\]; found range \[1.5, 1.5\]"),
    ],
)
def test_amat_rejects_bad_content(mutate, message):
    pixels, labels = mutate(np.zeros((2, 784)), [1, 2])
    with pytest.raises(ValueError, match=message):
        parse_amat(amat_text(pixels, labels), "bad.amat")


def test_amat_rejects_ragged_and_non_numeric_rows():
    good = amat_text(np.zeros((2, 784)), [1, 2]).splitlines()
    ragged = good[0] + "\n" + good[1].rsplit(" ", 2)[0] + "\n"
    with pytest.raises(ValueError, match=r"r\.amat: .* not 785 per row"):
        parse_amat(ragged, "r.amat")
    with pytest.raises(ValueError, match=r"n\.amat: not a numeric"):
        parse_amat(good[0] + "\n" + good[1].replace("0.000000e+00", "abc", 1), "n.amat")
    with pytest.raises(ValueError, match="empty"):
        parse_amat("  \n", "e.amat")


def write_originals(folder, name, n_small=6, n_large=4, zipped=False):
    rng = np.random.default_rng(1)
    zip_name, small, large = ORIGINAL_FILES[name]
    texts = {
        small: amat_text(rng.random((n_small, 784)), rng.integers(0, 10, n_small)),
        large: amat_text(rng.random((n_large, 784)), rng.integers(0, 10, n_large)),
    }
    folder.mkdir(parents=True)
    if zipped:
        with zipfile.ZipFile(folder / zip_name, "w") as zf:
            for member, text in texts.items():
                zf.writestr(f"inner/{member}", text)
    else:
        for member, text in texts.items():
            (folder / member).write_text(text)


@pytest.mark.parametrize("zipped", [False, True])
def test_original_variant_files_are_loaded(tmp_path, zipped):
    write_originals(tmp_path / "mnist-rot", "mnist-rot", zipped=zipped)
    ds = load_dataset("mnist-rot", root=tmp_path)
    assert len(ds.x_train) == 6 and len(ds.x_test) == 4  # official roles: train = 12000-row file
    assert ds.input_shape == (1, 28, 28) and ds.x_train.dtype == torch.float32
    swapped = load_dataset("mnist-rot", root=tmp_path, swap=True)
    assert torch.equal(swapped.x_train, ds.x_test) and torch.equal(swapped.y_test, ds.y_train)
    with pytest.raises(ValueError, match="only apply to generated variants"):
        load_dataset("mnist-rot", root=tmp_path, seed=1)
    assert not (tmp_path / "cache").exists()  # nothing generated or written


def test_corrupt_variant_zip_is_reported(tmp_path):
    (tmp_path / "mnist-rot").mkdir()
    (tmp_path / "mnist-rot" / "mnist_rotation_new.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"mnist_rotation_new\.zip: corrupt or truncated zip"):
        load_dataset("mnist-rot", root=tmp_path)


def test_source_original_without_files_lists_them(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist-back-rand", root=tmp_path, source="original")
    msg = str(e.value)
    assert "mnist_background_random_train.amat" in msg and "mnist_background_random_test.amat" in msg
    assert str(tmp_path / "mnist-back-rand") in msg and "mnist_background_random.zip" in msg


# -- restricted unpickler and CIFAR-10 -----------------------------------------------
def batch(n: int, seed: int, protocol: int = 2, str_keys: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    keys = ("data", "labels") if str_keys else (b"data", b"labels")
    return pickle.dumps({keys[0]: data, keys[1]: labels, b"batch_label": b"synthetic"}, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_safe_unpickler_loads_numpy_batches(protocol):
    out = safe_loads(batch(4, 0, protocol))
    assert out[b"data"].dtype == np.uint8 and out[b"data"].shape == (4, 3072)
    assert len(out[b"labels"]) == 4


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def test_safe_unpickler_refuses_code_execution(tmp_path):
    import builtins
    import os

    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(os.system, f"touch {marker}")}, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pkl: refusing to unpickle (posix|nt|os)\.system"):
        safe_loads(payload, "evil.pkl")
    assert not marker.exists()
    expr = f"open({str(marker)!r}, 'w').write('x')"
    with pytest.raises(ValueError, match=r"refusing to unpickle builtins\.eval"):
        safe_loads(pickle.dumps(_Evil(builtins.eval, expr)))
    assert not marker.exists()
    # The allowed _codecs.encode cannot be used to reach other codecs.
    import codecs

    with pytest.raises(ValueError, match="refusing codec"):
        safe_loads(pickle.dumps(_Evil2(codecs.encode, ("x", "rot13")), protocol=2))
    with pytest.raises(ValueError, match="not a valid pickle"):
        safe_loads(b"\x80\x02garbage")


class _Evil2:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A data root with six tiny synthetic CIFAR batches whose md5s are patched in."""
    folder = tmp_path / "root" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate(cifar.MD5):
        data = batch(3 if name != "test_batch" else 2, i, str_keys=(i == 1))
        (folder / name).write_bytes(data)
        monkeypatch.setitem(cifar.MD5, name, hashlib.md5(data).hexdigest())
    return tmp_path / "root"


def test_cifar_loads_synthetic_batches(cifar_root):
    ds = load_dataset("cifar10", root=cifar_root)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.input_shape == (3, 32, 32) and ds.class_names[0] == "airplane"
    raw = pickle.loads((cifar_root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    row = raw[b"data"][0]
    # Row layout: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
    assert torch.allclose(ds.x_train[0, 1, 2, 5], torch.tensor(row[1024 + 2 * 32 + 5] / 255.0, dtype=torch.float32))
    assert ds.y_train[:3].tolist() == raw[b"labels"]


def test_cifar_checksum_mismatch(cifar_root):
    path = cifar_root / "cifar-10-batches-py" / "test_batch"
    expected = cifar.MD5["test_batch"]
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ValueError, match=f"test_batch: expected md5 {expected}, got [0-9a-f]{{32}}"):
        load_dataset("cifar10", root=cifar_root)


def test_cifar_refuses_a_malicious_batch(cifar_root, monkeypatch):
    import os

    marker = cifar_root / "pwned"
    path = cifar_root / "cifar-10-batches-py" / "data_batch_3"
    data = pickle.dumps({b"data": _Evil(os.system, f"touch {marker}"), b"labels": []})
    path.write_bytes(data)
    monkeypatch.setitem(cifar.MD5, "data_batch_3", hashlib.md5(data).hexdigest())
    with pytest.raises(ValueError, match="data_batch_3: refusing to unpickle"):
        load_dataset("cifar10", root=cifar_root)
    assert not marker.exists()


def test_cifar_missing_lists_every_batch(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", root=tmp_path)
    msg = str(e.value)
    assert all(b in msg for b in cifar.MD5) and str(tmp_path / "cifar-10-batches-py") in msg


def test_cifar_extract_uses_data_filter(tmp_path, monkeypatch):
    """A tar member escaping the target folder is refused, not written."""
    data = batch(2, 0)
    monkeypatch.setitem(cifar.MD5, "data_batch_1", hashlib.md5(data).hexdigest())
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../../data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "out" / "cifar-10-batches-py"
    target.mkdir(parents=True)
    with pytest.raises(ValueError, match="cannot extract"):
        cifar._extract(archive, target)
    assert not (tmp_path / "data_batch_1").exists() and not list(target.iterdir())
