"""VGG-11 (configuration "A" of Simonyan & Zisserman 2015, "Very deep convolutional
networks for large-scale image recognition"), as used on small images by Evci
et al. (2018), "Mean replacement pruning".

Features: the configuration ``[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M]``
of 3×3 'same' convolutions (padding 1, so they keep the spatial size), each
followed by ``BatchNorm2d`` (``batch_norm=True``, the default) and a ReLU;
``M`` is a 2×2 max-pool. Small inputs cannot take all five pools, so a pool is
*skipped* when the map it would see is smaller than 2×2 (its output would be
empty): 32×32 keeps all five (32 → 16 → 8 → 4 → 2 → 1), 28×28 keeps the first
four (28 → 14 → 7 → 3 → 1), 8×8 keeps the first three (8 → 4 → 2 → 1). The
kept pools are listed in ``model.kept_pools`` (1-based, in network order).

Classifier: ``Linear(flat, 512) → ReLU → Linear(512, 512) → ReLU →
Linear(512, n_classes)``, where ``flat`` is the number of features after the
last kept pool. ``width`` multiplies every channel count (rounded, at least 1)
and leaves the classifier's 512 units alone. Convolutions keep their bias even
with batch norm, as torchvision's ``vgg11_bn`` does, so every conv has a
``bias`` for pruning code to adjust.

Layers: ``features.0`` (conv), ``features.1`` (batch norm), ``features.2``
(ReLU), ``features.3`` (pool), …; ``flatten``; ``classifier.0``, ``.2``, ``.4``
(linear).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from prunelab._validation import check_number, check_type
from prunelab.models._layers import Conv, Pool, Step, image_shape, scaled_width, trace
from prunelab.models.registry import MODELS

VGG11_CONFIG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
_NAME = "vgg11"


class VGG(nn.Sequential):
    """``features`` (conv [+ BN] + ReLU, max-pools) → ``flatten`` → ``classifier``."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        n_classes: int,
        *,
        config: tuple[int | str, ...] = VGG11_CONFIG,
        batch_norm: bool = True,
        width: float = 1.0,
        hidden: int = 512,
        name: str = _NAME,
    ):
        steps, kept_pools = _plan(input_shape, config, width)
        out_c, out_h, out_w = trace(name, input_shape, steps)
        features: list[nn.Module] = []
        channels = input_shape[0]
        for step in steps:
            if isinstance(step, Pool):
                features.append(nn.MaxPool2d(step.size))
                continue
            features.append(nn.Conv2d(channels, step.out_channels, step.kernel, padding=step.padding))
            if batch_norm:
                features.append(nn.BatchNorm2d(step.out_channels))
            features.append(nn.ReLU())
            channels = step.out_channels
        classifier = nn.Sequential(
            nn.Linear(out_c * out_h * out_w, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )
        super().__init__(OrderedDict(features=nn.Sequential(*features), flatten=nn.Flatten(), classifier=classifier))
        self.kept_pools = kept_pools


def _plan(
    input_shape: tuple[int, int, int], config: tuple[int | str, ...], width: float
) -> tuple[list[Step], list[int]]:
    """Conv and pool steps, skipping each pool that would see a map under 2×2."""
    _, height, wide = input_shape
    steps: list[Step] = []
    kept: list[int] = []
    n_pools = n_convs = 0
    for item in config:
        if item == "M":
            n_pools += 1
            if min(height, wide) >= 2:
                steps.append(Pool(f"pool{n_pools}", 2))
                kept.append(n_pools)
                height, wide = height // 2, wide // 2
        else:
            n_convs += 1
            steps.append(Conv(f"conv{n_convs}", scaled_width(int(item), width), 3, padding=1))
    return steps, kept


@MODELS.register(_NAME)
def vgg11(input_shape: tuple[int, ...], n_classes: int, *, batch_norm: bool = True, width: float = 1.0) -> VGG:
    """VGG-11 for small images; pools that would empty the map are skipped."""
    check_type("batch_norm", batch_norm, bool, where=_NAME)
    width = check_number("width", width, where=_NAME, low=0.0, closed="neither")
    return VGG(image_shape(input_shape, _NAME), n_classes, batch_norm=batch_norm, width=width)
