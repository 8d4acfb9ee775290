"""MNIST-style loading with tiny synthetic files: checksums, missing files, downloads from a
loopback HTTP server, and where generated variants are written."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch
from helpers import idx_gz
from PIL import Image

from prunelab.data import ChecksumError, DatasetNotFoundError, cifar, fetch, load_dataset, mnist, variants
from prunelab.data._download import download_file
from prunelab.data._paths import is_writable

N_TRAIN, N_TEST = 40, 30
FILES = list(mnist.MD5["mnist"])


pytestmark = pytest.mark.usefixtures("isolated_data")


@pytest.fixture
def synthetic(monkeypatch):
    """Tiny MNIST files (bytes by name) whose md5s are patched into the checksum table."""
    rng = np.random.default_rng(0)
    arrays = {
        mnist.TRAIN_IMAGES: rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        mnist.TRAIN_LABELS: rng.integers(0, 10, N_TRAIN).astype(np.uint8),
        mnist.TEST_IMAGES: rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        mnist.TEST_LABELS: rng.integers(0, 10, N_TEST).astype(np.uint8),
    }
    for name in (mnist.TRAIN_IMAGES, mnist.TEST_IMAGES):
        arrays[name][:, :4] = 0  # a blank top border, as in MNIST
    blobs = {name: idx_gz(a, 2051 if a.ndim == 3 else 2049) for name, a in arrays.items()}
    for name, blob in blobs.items():
        monkeypatch.setitem(mnist.MD5["mnist"], name, hashlib.md5(blob).hexdigest())
    return blobs, arrays


def write_mnist(root, blobs):
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        (root / "mnist" / name).write_bytes(blob)
    return root


# -- loading and checksums ----------------------------------------------------------
def test_load_synthetic_mnist(tmp_path, synthetic):
    blobs, arrays = synthetic
    root = write_mnist(tmp_path / "root", blobs)
    ds = load_dataset("mnist", root=root)
    assert ds.x_train.shape == (N_TRAIN, 1, 28, 28) and ds.x_test.shape == (N_TEST, 1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays[mnist.TRAIN_IMAGES]).float() / 255)
    assert ds.y_test.tolist() == arrays[mnist.TEST_LABELS].tolist()
    assert ds.y_train.dtype == torch.int64


def test_checksum_mismatch_names_file_and_both_md5s(tmp_path, synthetic):
    blobs, _ = synthetic
    root = write_mnist(tmp_path / "root", blobs)
    path = root / "mnist" / mnist.TEST_LABELS
    path.write_bytes(blobs[mnist.TEST_LABELS][:-3])
    expected = mnist.MD5["mnist"][mnist.TEST_LABELS]
    actual = hashlib.md5(path.read_bytes()).hexdigest()
    with pytest.raises(ChecksumError) as e:
        load_dataset("mnist", root=root)
    msg = str(e.value)
    assert str(path) in msg and expected in msg and actual in msg and "delete it" in msg
    assert isinstance(e.value, ValueError)


def test_truncated_gzip_with_matching_md5_is_a_clear_error(tmp_path, synthetic, monkeypatch):
    blobs, _ = synthetic
    root = write_mnist(tmp_path / "root", blobs)
    cut = blobs[mnist.TRAIN_IMAGES][:200]
    (root / "mnist" / mnist.TRAIN_IMAGES).write_bytes(cut)
    monkeypatch.setitem(mnist.MD5["mnist"], mnist.TRAIN_IMAGES, hashlib.md5(cut).hexdigest())
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        load_dataset("mnist", root=root)


def test_label_count_mismatch_is_detected(tmp_path, synthetic, monkeypatch):
    blobs, _ = synthetic
    root = write_mnist(tmp_path / "root", blobs)
    short = idx_gz(np.zeros(N_TEST - 1, np.uint8), 2049)
    (root / "mnist" / mnist.TEST_LABELS).write_bytes(short)
    monkeypatch.setitem(mnist.MD5["mnist"], mnist.TEST_LABELS, hashlib.md5(short).hexdigest())
    with pytest.raises(ValueError, match=f"{N_TEST - 1} labels for {N_TEST} images"):
        load_dataset("mnist", root=root)


# -- missing files -----------------------------------------------------------------
def test_missing_offline_lists_every_file_and_how_to_fix(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist", root=root)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert all(f in msg for f in FILES) and "4 file(s) missing" in msg
    assert str(root / "fashion-mnist") in msg and str(tmp_path / "cache" / "fashion-mnist") in msg
    assert "PRUNELAB_DATA" in msg and "download=True" in msg and "prunelab data fetch fashion-mnist" in msg
    assert not root.exists()  # looking does not create anything


def test_partially_missing_lists_only_missing(tmp_path, synthetic):
    blobs, _ = synthetic
    root = write_mnist(tmp_path / "root", {k: v for k, v in blobs.items() if "t10k" not in k})
    with pytest.raises(DatasetNotFoundError, match="2 file") as e:
        load_dataset("mnist", root=root)
    assert mnist.TEST_IMAGES in str(e.value) and mnist.TRAIN_IMAGES not in str(e.value)


def test_files_in_cache_dir_are_found_when_data_root_lacks_them(tmp_path, synthetic, monkeypatch):
    blobs, _ = synthetic
    write_mnist(tmp_path / "cache", blobs)
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path / "data"))
    assert len(load_dataset("mnist").x_train) == N_TRAIN


# -- downloads from a loopback server ----------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server API)
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 in a background thread; set ``routes`` to serve bytes."""
    handler = type("Handler", (_Handler,), {"routes": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.routes = handler.routes
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_falls_back_from_404_mirror(tmp_path, synthetic, server, monkeypatch):
    blobs, arrays = synthetic
    server.routes.update({f"/good/{n}": b for n, b in blobs.items()})
    monkeypatch.setitem(mnist.MIRRORS, "mnist", [f"{server.base}/gone/", f"{server.base}/good/"])
    ds = load_dataset("mnist", download=True)
    target = tmp_path / "cache" / "mnist"
    assert sorted(os.listdir(target)) == sorted(FILES)  # no temp files left
    assert ds.y_train.tolist() == arrays[mnist.TRAIN_LABELS].tolist()
    # A second load finds the files and does not touch the network.
    server.routes.clear()
    assert len(load_dataset("mnist").x_test) == N_TEST


def test_fetch_downloads_and_verifies_only(tmp_path, synthetic, server, monkeypatch):
    blobs, _ = synthetic
    server.routes.update({f"/m/{n}": b for n, b in blobs.items()})
    monkeypatch.setitem(mnist.MIRRORS, "mnist", [f"{server.base}/m/"])
    paths = fetch("mnist", root=tmp_path / "root")
    assert sorted(p.name for p in paths) == sorted(FILES)
    assert all(p.parent == tmp_path / "root" / "mnist" for p in paths)


def test_wrong_bytes_from_server_is_a_checksum_error_and_leaves_nothing(tmp_path, synthetic, server, monkeypatch):
    blobs, _ = synthetic
    server.routes.update({f"/bad/{n}": b + b"tampered" for n, b in blobs.items()})
    monkeypatch.setitem(mnist.MIRRORS, "mnist", [f"{server.base}/bad/"])
    with pytest.raises(ChecksumError) as e:
        load_dataset("mnist", root=tmp_path / "root", download=True)
    msg = str(e.value)
    first = next(iter(blobs))
    assert first in msg and mnist.MD5["mnist"][first] in msg
    assert hashlib.md5(blobs[first] + b"tampered").hexdigest() in msg
    assert os.listdir(tmp_path / "root" / "mnist") == []


def test_all_mirrors_failing_is_one_not_found_error(tmp_path, synthetic, server, monkeypatch):
    monkeypatch.setitem(mnist.MIRRORS, "mnist", [f"{server.base}/a/", "http://127.0.0.1:9/b/"])
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", root=tmp_path / "root", download=True)
    msg = str(e.value)
    assert all(f in msg for f in FILES) and "The download failed" in msg
    assert "/a/t10k-images-idx3-ubyte.gz: HTTP 404" in msg and "127.0.0.1:9/b/" in msg


def test_download_with_progress_bar(tmp_path, synthetic, server):
    blobs, _ = synthetic
    body = blobs[mnist.TRAIN_LABELS]
    server.routes["/f"] = body
    dest = download_file([f"{server.base}/f"], tmp_path / "d" / "f.gz", hashlib.md5(body).hexdigest(), progress=True)
    assert dest.read_bytes() == body and os.listdir(tmp_path / "d") == ["f.gz"]


def test_cifar_download_extracts_the_verified_archive(tmp_path, server, monkeypatch):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i, name in enumerate(cifar.MD5):
            n = 2 if name == "test_batch" else 3
            data = pickle.dumps(
                {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10] * n}, protocol=2
            )
            monkeypatch.setitem(cifar.MD5, name, hashlib.md5(data).hexdigest())
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    server.routes[f"/kriz/{cifar.ARCHIVE}"] = archive
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", hashlib.md5(archive).hexdigest())
    monkeypatch.setattr(cifar, "MIRRORS", [f"{server.base}/none/", f"{server.base}/kriz/"])
    ds = load_dataset("cifar10", root=tmp_path / "root", download=True)
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.y_test.tolist() == [5, 5]
    assert sorted(os.listdir(tmp_path / "root")) == ["cifar-10-batches-py"]  # archive removed
    assert sorted(os.listdir(tmp_path / "root" / "cifar-10-batches-py")) == sorted(cifar.MD5)


# -- writable places -----------------------------------------------------------------
@pytest.fixture
def small_variants(monkeypatch):
    """Generate variants from a 70-image pool: 30 'train' + 40 'test'."""
    monkeypatch.setattr(variants, "N_SMALL", 30)
    monkeypatch.setattr(variants, "N_LARGE", 40)


@pytest.fixture
def read_only_root(tmp_path, synthetic):
    root = write_mnist(tmp_path / "ro", synthetic[0])
    for p in (root / "mnist", root):
        p.chmod(0o555)
    yield root
    for p in (root, root / "mnist"):
        p.chmod(0o755)


def test_permission_bits_decide_writability(read_only_root, tmp_path):
    assert not is_writable(read_only_root)
    assert not is_writable(read_only_root / "new" / "sub")
    assert is_writable(tmp_path / "not-yet-there")


def test_read_only_root_generated_variant_goes_to_cache(read_only_root, tmp_path, small_variants, monkeypatch):
    monkeypatch.setenv("PRUNELAB_DATA", str(read_only_root))
    ds = load_dataset("mnist-back-rand")
    assert len(ds.x_train) == 30 and len(ds.x_test) == 40
    assert sorted(os.listdir(read_only_root)) == ["mnist"]
    cache = tmp_path / "cache" / "mnist-back-rand" / "generated-v1-seed0"
    assert sorted(os.listdir(cache)) == [
        "manifest.json",
        "test_images.npy",
        "test_labels.npy",
        "train_images.npy",
        "train_labels.npy",
    ]
    again = load_dataset("mnist-back-rand")  # read back from the cache
    assert torch.equal(again.x_test, ds.x_test)
    other = load_dataset("mnist-back-rand", seed=1)
    assert not torch.equal(other.x_train, ds.x_train)
    swapped = load_dataset("mnist-back-rand", swap=True)
    assert len(swapped.x_train) == 40 and torch.equal(swapped.x_train, ds.x_test)


def test_writable_root_receives_generated_files(tmp_path, synthetic, small_variants):
    root = write_mnist(tmp_path / "rw", synthetic[0])
    load_dataset("mnist-rot", root=root)
    assert (root / "mnist-rot" / "generated-v1-seed0" / "manifest.json").is_file()
    assert not (tmp_path / "cache").exists()


def test_flipped_byte_in_generated_cache_is_detected(tmp_path, synthetic, small_variants):
    root = write_mnist(tmp_path / "rw", synthetic[0])
    load_dataset("mnist-rot", root=root)
    folder = root / "mnist-rot" / "generated-v1-seed0"
    path = folder / "train_images.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 of train_images\.npy.*Delete the folder") as e:
        load_dataset("mnist-rot", root=root)
    assert str(folder) in str(e.value)


def test_missing_manifest_regenerates(tmp_path, synthetic, small_variants):
    root = write_mnist(tmp_path / "rw", synthetic[0])
    first = load_dataset("mnist-rot", root=root)
    folder = root / "mnist-rot" / "generated-v1-seed0"
    (folder / "manifest.json").unlink()
    (folder / "test_images.npy").write_bytes(b"half a file")
    again = load_dataset("mnist-rot", root=root)
    assert torch.equal(again.x_test, first.x_test) and (folder / "manifest.json").is_file()


def test_variant_without_mnist_explains_both_routes(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist-rot", root=tmp_path / "none")
    msg = str(e.value)
    assert "original .amat files" in msg and "needs MNIST" in msg and mnist.TRAIN_IMAGES in msg


def _png(path, rgb):
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), "RGB").save(path)


def test_back_image_from_png_backgrounds(tmp_path, synthetic, small_variants):
    root = write_mnist(tmp_path / "rw", synthetic[0])
    bg = tmp_path / "bg"
    bg.mkdir()
    # Three flat colour images: greys by luma 0.299 R + 0.587 G + 0.114 B.
    colours = {"a.png": (255, 0, 0), "b.png": (0, 255, 0), "c.png": (0, 0, 255)}
    for name, c in colours.items():
        _png(bg / name, np.broadcast_to(np.array(c, np.uint8), (30, 33, 3)))
    ds = load_dataset("mnist-back-image", root=root, backgrounds=bg)
    grey = {n: round(0.299 * r + 0.587 * g + 0.114 * b) for n, (r, g, b) in colours.items()}

    # The blank top rows show only the background. The 40-row split uses a.png and b.png
    # (first two thirds by name), the 30-row split only c.png.
    def border(x):
        return set((x[:, 0, :4] * 255).round().unique().tolist())

    assert border(ds.x_train) == {grey["c.png"]}
    assert border(ds.x_test) == {grey["a.png"], grey["b.png"]}
    # Ink pixels (255) stay 255 whatever the background.
    assert ds.x_train.max() == 1.0
    with pytest.raises(DatasetNotFoundError, match="no images"):
        load_dataset("mnist-back-image", root=root, backgrounds=tmp_path / "nothing")
