"""Variant recipes as pure functions on small arrays, and the generated-cache store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prunelab.data import generate_variant
from prunelab.data._store import load_arrays, save_arrays
from prunelab.data.backgrounds import to_grey
from prunelab.data.recipes import composite, make_variant_splits, rotate_images, split_backgrounds

KINDS = ["mnist-rot", "mnist-back-rand", "mnist-back-image"]


def blobs(n: int = 16, seed: int = 0) -> np.ndarray:
    """Digit-like uint8 images: a bright off-centre stroke, empty border."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        r, c = rng.integers(8, 14), rng.integers(8, 14)
        out[i, r : r + 8, c : c + 3] = 255
        out[i, r + 6 : r + 8, c : c + 8] = 200
    return out


def gradient_backgrounds() -> list[np.ndarray]:
    """Backgrounds whose every pixel value is unique, so a patch reveals its source window."""
    sizes = [(30, 31), (29, 33), (32, 30)]
    out, offset = [], 0
    for h, w in sizes:
        out.append(((np.arange(h * w).reshape(h, w) + offset) / 4000.0).astype(np.float32))
        offset += h * w
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_generation_is_deterministic_in_seed(kind):
    images, labels = blobs(), np.arange(16) % 10
    bgs = gradient_backgrounds()
    a, la = generate_variant(kind, images, labels, seed=5, backgrounds=bgs)
    b, _ = generate_variant(kind, images, labels, seed=5, backgrounds=bgs)
    c, _ = generate_variant(kind, images, labels, seed=6, backgrounds=bgs)
    assert a.dtype == np.uint8 and a.shape == images.shape
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    assert np.array_equal(la, labels) and la.dtype == np.int64


def test_rotation_by_zero_is_identity_and_quarter_turn_is_rot90():
    x = torch.from_numpy(blobs(4)).float() / 255
    assert torch.allclose(rotate_images(x, torch.zeros(4, dtype=torch.float64)), x, atol=1e-5)
    # With align_corners=False the pixel grid is symmetric about the image centre, so a
    # quarter turn lands exactly on pixels: counter-clockwise as displayed.
    quarter = rotate_images(x, torch.full((4,), math.pi / 2, dtype=torch.float64))
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(1, 2)), atol=1e-5)
    half = rotate_images(x, torch.full((4,), math.pi, dtype=torch.float64))
    assert torch.allclose(half, torch.flip(x, dims=(1, 2)), atol=1e-5)


def test_rotation_roughly_preserves_ink():
    x = torch.from_numpy(blobs(32)).float() / 255
    angles = torch.linspace(0, 2 * math.pi, 32, dtype=torch.float64)
    ink_before, ink_after = x.sum(dim=(1, 2)), rotate_images(x, angles).sum(dim=(1, 2))
    assert torch.allclose(ink_after, ink_before, rtol=0.03)
    rotated, _ = generate_variant("mnist-rot", blobs(32), np.zeros(32), seed=0)
    ratio = rotated.astype(float).sum(axis=(1, 2)) / blobs(32).astype(float).sum(axis=(1, 2))
    assert np.all(np.abs(ratio - 1) < 0.05)
    assert rotated.tobytes() != blobs(32).tobytes()


def test_composite_keeps_ink_and_shows_background():
    d = torch.tensor([[1.0, 0.0, 0.5]])
    b = torch.tensor([[0.3, 0.3, 0.3]])
    assert torch.allclose(composite(d, b), torch.tensor([[1.0, 0.3, 0.65]]))


@pytest.mark.parametrize("kind", ["mnist-back-rand", "mnist-back-image"])
def test_background_recipes_keep_ink_and_take_background_elsewhere(kind):
    images = blobs(20)
    bgs = gradient_backgrounds()
    out, _ = generate_variant(kind, images, np.zeros(20), seed=3, backgrounds=bgs)
    # Background draws do not depend on the digits: blank digits show the bare background.
    bare, _ = generate_variant(kind, np.zeros_like(images), np.zeros(20), seed=3, backgrounds=bgs)
    ink, empty = images == 255, images == 0
    assert np.all(out[ink] == 255)
    assert np.array_equal(out[empty], bare[empty])
    assert bare.std() > 10  # a real background, not a constant
    mid = images == 200  # d = 200/255: x = d + (1 - d) b
    expected = np.round(255 * (200 / 255 + (1 - 200 / 255) * bare[mid] / 255.0))
    assert np.all(np.abs(out[mid] - expected) <= 1)


def test_back_image_patches_are_windows_of_the_backgrounds():
    bgs = gradient_backgrounds()
    out, _ = generate_variant(
        "mnist-back-image", np.zeros((60, 28, 28), np.uint8), np.zeros(60), seed=1, backgrounds=bgs
    )
    windows = {}
    for i, bg in enumerate(bgs):
        q = np.round(bg * 255).astype(np.uint8)
        for r in range(bg.shape[0] - 27):
            for c in range(bg.shape[1] - 27):
                windows[q[r : r + 28, c : c + 28].tobytes()] = (i, r, c)
    found = [windows.get(patch.tobytes()) for patch in out]
    assert all(f is not None for f in found)
    assert {f[0] for f in found} == {0, 1, 2}  # every image gets used
    assert len(set(found)) > 20  # at many positions


def test_back_image_needs_backgrounds():
    with pytest.raises(ValueError, match="'backgrounds' parameter of generate_variant"):
        generate_variant("mnist-back-image", blobs(2), np.zeros(2), seed=0)
    with pytest.raises(ValueError, match="at least 28x28"):
        generate_variant("mnist-back-image", blobs(2), np.zeros(2), seed=0, backgrounds=[np.zeros((10, 40))])


def test_generate_variant_validates_arguments():
    with pytest.raises(ValueError, match=r"'kind' parameter of generate_variant.*did you mean 'mnist-rot'"):
        generate_variant("mnist-rott", blobs(2), np.zeros(2), seed=0)
    with pytest.raises(ValueError, match="uint8 array"):
        generate_variant("mnist-rot", blobs(2).astype(np.float32), np.zeros(2), seed=0)
    with pytest.raises(ValueError, match="'labels' parameter"):
        generate_variant("mnist-rot", blobs(2), np.zeros(3), seed=0)
    with pytest.raises(ValueError, match="'seed' parameter"):
        generate_variant("mnist-rot", blobs(2), np.zeros(2), seed=-1)


def test_splits_are_disjoint_and_backgrounds_split_by_image():
    pool = blobs(50)
    pool[:, :3] = 0  # blank top rows show the background
    ids = np.arange(50)  # labels used as identities
    flat = [np.full((30, 30), v, np.float32) for v in (0.1, 0.5, 0.9)]
    splits = make_variant_splits("mnist-back-image", pool, ids, seed=2, backgrounds=flat, n_small=12, n_large=30)
    small_ids, large_ids = splits["small"][1], splits["large"][1]
    assert len(small_ids) == 12 and len(large_ids) == 30
    assert not set(small_ids) & set(large_ids)
    assert set(np.unique(splits["large"][0][:, :3])) == {round(25.5), round(127.5)}
    assert set(np.unique(splits["small"][0][:, :3])) == {round(229.5)}
    again = make_variant_splits("mnist-back-image", pool, ids, seed=2, backgrounds=flat, n_small=12, n_large=30)
    assert again["large"][0].tobytes() == splits["large"][0].tobytes()
    with pytest.raises(ValueError, match="fewer than"):
        make_variant_splits("mnist-rot", pool, ids, seed=0, n_small=40, n_large=20)


def test_split_backgrounds_two_thirds_one_third():
    assert split_backgrounds(list("abcdef")) == (list("abcd"), list("ef"))
    assert split_backgrounds(list("ab")) == (["a"], ["b"])
    with pytest.raises(ValueError, match="at least 2"):
        split_backgrounds(["a"])


def test_png_to_grey_uses_luma(tmp_path):
    from PIL import Image

    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "x.png")
    grey = to_grey(tmp_path / "x.png")
    expected = (rgb @ np.array([0.299, 0.587, 0.114])) / 255
    assert grey.dtype == np.float32 and np.allclose(grey, expected, atol=1e-6)


def test_store_round_trip_and_corruption(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.uint8).reshape(3, 4), "b": np.arange(3, dtype=np.int64)}
    assert load_arrays(tmp_path / "s") is None
    save_arrays(tmp_path / "s", arrays, {"seed": 4})
    manifest, back = load_arrays(tmp_path / "s")
    assert manifest["seed"] == 4 and set(manifest["files"]) == {"a.npy", "b.npy"}
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    path = tmp_path / "s" / "a.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sha256 of a\.npy .* Delete the folder"):
        load_arrays(tmp_path / "s")
    path.unlink()
    with pytest.raises(ValueError, match=r"a\.npy is missing"):
        load_arrays(tmp_path / "s")
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".part")]
