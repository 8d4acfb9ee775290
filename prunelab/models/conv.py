"""Small convolutional nets: ``conv-pool-linear``, ``small_conv`` and ``medium_conv``.

``conv-pool-linear`` is the convolutional baseline of Baktash, Natale & Viennot
(2019), "A comparative study of neural network compression" (arXiv:1910.11144):
one convolution, one max-pool and one linear layer, searched over kernel 5…10,
channels 4…12, stride 1…3, pool 2…4 and dropout 0…0.2::

    conv1 (channels, kernel×kernel, stride, no padding) → ReLU → max-pool (pool)
    → dropout → flatten → fc1 (n_classes)

``small_conv`` and ``medium_conv`` are the two convolutional nets of Evci,
Le Roux, Castro & Bottou (2018), "Mean replacement pruning" (ICLR 2019
submission). Each convolution uses 'same' padding (``kernel // 2``) and is
followed by a ReLU and a 2×2 max-pool, so 28×28 inputs go 28 → 14 → 7 → 3::

    small_conv:  conv 32 k5, conv 64 k3, conv 128 k3 → fc 512 → fc 128 → fc n_classes
    medium_conv: conv 64 k5, conv 128 k3, conv 256 k3 → fc 1024 → fc 256 → fc n_classes

Layers: ``convK``, ``convK_relu``, ``convK_pool``, [``dropout``], ``flatten``,
``fcK``, ``fcK_relu``; the last ``fcK`` gives the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from prunelab._validation import check_number
from prunelab.models._layers import Conv, Pool, Step, conv_layers, dense_layers, trace
from prunelab.models.registry import MODELS


class ConvPoolLinear(nn.Sequential):
    """conv → ReLU → max-pool → dropout → linear; see the module docstring."""

    def __init__(
        self,
        input_shape: tuple[int, ...],  # (C, H, W), checked by trace
        n_classes: int,
        *,
        kernel: int = 5,
        channels: int = 8,
        stride: int = 1,
        pool: int = 2,
        dropout: float = 0.0,
    ):
        steps = _conv_pool_linear_steps(kernel, channels, stride, pool)
        out_c, out_h, out_w = trace("conv-pool-linear", input_shape, steps)
        layers = conv_layers(steps, input_shape[0])
        layers["dropout"] = nn.Dropout(dropout)
        layers["flatten"] = nn.Flatten()
        layers.update(dense_layers(out_c * out_h * out_w, [], n_classes))
        super().__init__(layers)


def _conv_pool_linear_steps(kernel: int, channels: int, stride: int, pool: int) -> list[Step]:
    return [Conv("conv1", channels, kernel, stride=stride, param="kernel"), Pool("conv1_pool", pool, param="pool")]


@MODELS.register("conv-pool-linear", "conv_pool_linear")
def conv_pool_linear(
    input_shape: tuple[int, ...],
    n_classes: int,
    *,
    kernel: int = 5,
    channels: int = 8,
    stride: int = 1,
    pool: int = 2,
    dropout: float = 0.0,
) -> ConvPoolLinear:
    """The conv → max-pool → linear baseline (valid padding)."""
    where = "conv-pool-linear"
    kernel = check_number("kernel", kernel, where=where, low=1, integer=True)
    channels = check_number("channels", channels, where=where, low=1, integer=True)
    stride = check_number("stride", stride, where=where, low=1, integer=True)
    pool = check_number("pool", pool, where=where, low=1, integer=True)
    dropout = check_number("dropout", dropout, where=where, low=0.0, high=1.0, closed="left")
    return ConvPoolLinear(
        input_shape, n_classes, kernel=kernel, channels=channels, stride=stride, pool=pool, dropout=dropout
    )


class ConvNet(nn.Sequential):
    """Same-padded conv → ReLU → 2×2 max-pool blocks, then a ReLU MLP head."""

    def __init__(
        self,
        name: str,
        input_shape: tuple[int, ...],  # (C, H, W), checked by trace
        n_classes: int,
        convs: Sequence[tuple[int, int]],
        dense: Sequence[int],
    ):
        steps: list[Step] = []
        for index, (out_channels, kernel) in enumerate(convs, start=1):
            steps += [Conv(f"conv{index}", out_channels, kernel, padding=kernel // 2), Pool(f"conv{index}_pool", 2)]
        out_c, out_h, out_w = trace(name, input_shape, steps)
        layers = conv_layers(steps, input_shape[0])
        layers["flatten"] = nn.Flatten()
        layers.update(dense_layers(out_c * out_h * out_w, dense, n_classes))
        super().__init__(layers)


@MODELS.register("small_conv")
def small_conv(input_shape: tuple[int, ...], n_classes: int) -> ConvNet:
    """Evci et al.'s small conv net: conv 32/64/128 (k5, k3, k3) → fc 512 → fc 128."""
    return ConvNet("small_conv", input_shape, n_classes, [(32, 5), (64, 3), (128, 3)], [512, 128])


@MODELS.register("medium_conv")
def medium_conv(input_shape: tuple[int, ...], n_classes: int) -> ConvNet:
    """Evci et al.'s medium conv net: conv 64/128/256 (k5, k3, k3) → fc 1024 → fc 256."""
    return ConvNet("medium_conv", input_shape, n_classes, [(64, 5), (128, 3), (256, 3)], [1024, 256])
