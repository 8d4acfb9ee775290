"""Pure, seeded recipes that turn MNIST digits into the Larochelle et al. (2007) variants.

The original ``.amat`` files are rarely at hand, so prunelab can regenerate
look-alikes from MNIST. Everything here is a pure function of its arguments
(images, labels, seed, backgrounds): same inputs, same bytes out. All random draws
come from one ``torch.Generator`` seeded with ``seed``, in a fixed order.

Recipes (digit intensity ``d`` in [0, 1], 0 = background, 1 = ink):

* ``mnist-rot`` — rotate by an angle uniform in [0, 2π) about the image centre,
  bilinear interpolation, zeros outside (``affine_grid`` + ``grid_sample``,
  ``align_corners=False``);
* ``mnist-back-rand`` — background ``b`` uniform in [0, 1] per pixel;
* ``mnist-back-image`` — ``b`` a 28x28 patch at a uniform position of a uniformly
  chosen greyscale background image;

with, for both background recipes, the "ink over background" composite
``x = d + (1 - d) * b``. Outputs are quantised to uint8: ``round(255 * x)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prunelab._validation import SEED, Options, Types, validate_params

RECIPE_VERSION = 1
KINDS = ("mnist-rot", "mnist-back-rand", "mnist-back-image")
_CHUNK = 8192  # images per grid_sample call, to bound memory


def rotate_images(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each ``(N, H, W)`` image by ``angles[i]`` radians about its centre.

    Bilinear interpolation, zero fill, ``align_corners=False`` (so pixel centres map
    exactly and angle 0 is the identity). Positive angles turn the content
    counter-clockwise as displayed (row 0 at the top).
    """
    n, h, w = images.shape
    cos, sin = torch.cos(angles).float(), torch.sin(angles).float()
    zero = torch.zeros_like(cos)
    # affine_grid maps each output location p to the input location R(θ)·p it samples,
    # so input content at q lands at R(-θ)·q; with y pointing down, that is a
    # counter-clockwise turn by θ on screen.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    out = torch.empty((n, h, w), dtype=torch.float32)
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        grid = F.affine_grid(theta[part], [len(theta[part]), 1, h, w], align_corners=False)
        out[part] = F.grid_sample(
            images[part, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[:, 0]
    return out


def composite(digits: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Ink over background: ``d + (1 - d) * b`` (ink pixels stay 1, empty pixels show ``b``)."""
    return digits + (1.0 - digits) * background


def background_patches(
    images: Sequence[torch.Tensor], n: int, size: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """``n`` patches of ``size``, each from a uniformly chosen image at a uniform position.

    Draws, in order: image indices, then top and left offsets (as uniforms scaled to
    each chosen image's valid range). Gathered with one fancy index per image.
    """
    ph, pw = size
    heights = torch.tensor([im.shape[0] for im in images])
    widths = torch.tensor([im.shape[1] for im in images])
    choice = torch.randint(len(images), (n,), generator=generator)
    u_top = torch.rand(n, generator=generator, dtype=torch.float64)
    u_left = torch.rand(n, generator=generator, dtype=torch.float64)
    top = (u_top * (heights[choice] - ph + 1)).long()
    left = (u_left * (widths[choice] - pw + 1)).long()
    rows, cols = torch.arange(ph), torch.arange(pw)
    out = torch.empty((n, ph, pw), dtype=torch.float32)
    for i, image in enumerate(images):
        sel = torch.nonzero(choice == i).flatten()
        if len(sel):
            r = (top[sel, None] + rows)[:, :, None]
            c = (left[sel, None] + cols)[:, None, :]
            out[sel] = image.float()[r, c]
    return out


def _as_backgrounds(
    backgrounds: Sequence[np.ndarray | torch.Tensor] | None, size: tuple[int, int]
) -> list[torch.Tensor]:
    where = "generate_variant"
    if backgrounds is None or len(backgrounds) == 0:
        raise ValueError(
            f"the 'backgrounds' parameter of {where} must be a non-empty sequence "
            f"of greyscale images for kind 'mnist-back-image'"
        )
    out = []
    for i, b in enumerate(backgrounds):
        t = torch.as_tensor(np.asarray(b, dtype=np.float32))
        if t.dim() != 2 or t.shape[0] < size[0] or t.shape[1] < size[1]:
            raise ValueError(
                f"background {i} of {where} must be a 2-D greyscale image at least "
                f"{size[0]}x{size[1]}; got shape {tuple(t.shape)}"
            )
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError(f"background {i} of {where} must have values in [0, 1]")
        out.append(t)
    return out


@validate_params({"kind": [Options(KINDS)], "images_uint8": [Types(np.ndarray)], "seed": [SEED]})
def generate_variant(
    kind: str,
    images_uint8: np.ndarray,
    labels: np.ndarray,
    seed: int,
    backgrounds: Sequence[np.ndarray | torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply recipe ``kind`` to every image; return ``(uint8 images (N, H, W), int64 labels)``.

    ``images_uint8``: ``(N, H, W)`` uint8 digits (0 background, 255 ink).
    ``backgrounds``: greyscale float images in [0, 1], needed for ``mnist-back-image``.
    Deterministic: the same arguments give the same bytes.
    """
    where = "generate_variant"
    seed = int(seed)
    if images_uint8.dtype != np.uint8 or images_uint8.ndim != 3:
        raise ValueError(
            f"the 'images_uint8' parameter of {where} must be a uint8 array of "
            f"shape (N, H, W). Got {images_uint8.dtype} {images_uint8.shape} instead."
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images_uint8),):
        raise ValueError(
            f"the 'labels' parameter of {where} must have shape ({len(images_uint8)},). Got {labels.shape} instead."
        )
    n, h, w = images_uint8.shape
    g = torch.Generator().manual_seed(seed)
    digits = torch.tensor(images_uint8).float().div_(255.0)
    if kind == "mnist-rot":
        angles = torch.rand(n, generator=g, dtype=torch.float64) * (2 * math.pi)
        out = rotate_images(digits, angles)
    elif kind == "mnist-back-rand":
        out = composite(digits, torch.rand((n, h, w), generator=g))
    else:
        pool = _as_backgrounds(backgrounds, (h, w))
        out = composite(digits, background_patches(pool, n, (h, w), g))
    quantised = out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return quantised.numpy(), labels.copy()


def split_seed(seed: int, split: int) -> int:
    """An independent 32-bit seed for split number ``split`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, split]).generate_state(1)[0])


def split_backgrounds(items: Sequence) -> tuple[list, list]:
    """Sorted backgrounds → (first two thirds, last third): (large split's, small split's).

    Splitting by image (not by patch) means the two splits never share a background.
    """
    n = len(items)
    if n < 2:
        raise ValueError(
            f"mnist-back-image needs at least 2 background images so that train and test use different ones; got {n}"
        )
    cut = max(1, (2 * n) // 3)
    return list(items[:cut]), list(items[cut:])


def make_variant_splits(
    kind: str,
    pool_images: np.ndarray,
    pool_labels: np.ndarray,
    seed: int,
    backgrounds: Sequence[np.ndarray] | None = None,
    n_small: int = 12000,
    n_large: int = 50000,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Draw two disjoint splits from a pool of digits and apply the recipe to each.

    A permutation seeded with ``seed`` picks the ``n_small``-row split (its first
    ``n_small`` indices) and the ``n_large``-row split (the next ``n_large``).
    ``backgrounds`` (sorted by file name) are split by :func:`split_backgrounds`:
    two thirds for the large split, one third for the small one.
    Returns ``{"small": (x, y), "large": (x, y)}``.
    """
    if len(pool_images) < n_small + n_large:
        raise ValueError(
            f"{kind}: the pool has {len(pool_images)} images, fewer than the {n_small} + {n_large} the two splits need"
        )
    perm = torch.randperm(len(pool_images), generator=torch.Generator().manual_seed(seed)).numpy()
    parts = {"small": perm[:n_small], "large": perm[n_small : n_small + n_large]}
    bgs: dict[str, list | None] = {"small": None, "large": None}
    if kind == "mnist-back-image":
        bgs["large"], bgs["small"] = split_backgrounds(list(backgrounds or []))
    out = {}
    for i, split in enumerate(("small", "large")):
        idx = parts[split]
        out[split] = generate_variant(
            kind, pool_images[idx], pool_labels[idx], split_seed(seed, i), backgrounds=bgs[split]
        )
    return out
