"""LeNet-5 as defined by Caffe's MNIST example, the pruning literature's LeNet-5.

Han, Pool, Tran & Dally (2015), "Learning both weights and connections for
efficient neural networks", and Dong, Chen & Pan (2017), "Learning to prune
deep neural networks via layer-wise optimal brain surgeon" (L-OBS), prune
Caffe's ``lenet_train_test.prototxt``::

    conv1 (20 filters 5×5) → max-pool 2 → conv2 (50 filters 5×5) → max-pool 2
    → fc1 (500) → ReLU → fc2 (n_classes)

431,080 parameters on 1×28×28 inputs. Caffe puts no non-linearity after the
convolutions, and neither do we by default; many PyTorch ports add one, which
``conv_relu=True`` reproduces (same parameters, different function).

``width`` multiplies the three hidden widths (20 filters, 50 filters, 500 units; each rounded,
at least 1), which makes a width family for large-sparse vs small-dense comparisons:
``width=0.25`` has 5, 12 and 125 (27,027 parameters on MNIST).

Layers: ``conv1``, [``conv1_relu``], ``conv1_pool``, ``conv2``, [``conv2_relu``],
``conv2_pool``, ``flatten``, ``fc1``, ``fc1_relu``, ``fc2``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from prunelab._validation import check_number, check_type
from prunelab.models._layers import Conv, Pool, conv_layers, dense_layers, scaled_width, trace
from prunelab.models.registry import MODELS

_NAME = "lenet5"


def _steps(width: float) -> tuple:
    return (
        Conv("conv1", scaled_width(20, width), 5),
        Pool("conv1_pool", 2),
        Conv("conv2", scaled_width(50, width), 5),
        Pool("conv2_pool", 2),
    )


class LeNet5(nn.Sequential):
    """Caffe LeNet-5 for ``(C, H, W)`` inputs; see the module docstring."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, *, conv_relu: bool = False, width: float = 1.0):
        steps = _steps(width)
        channels, height, map_width = trace(_NAME, input_shape, steps)
        layers = conv_layers(steps, input_shape[0], relu=conv_relu)
        layers["flatten"] = nn.Flatten()
        layers.update(dense_layers(channels * height * map_width, [scaled_width(500, width)], n_classes))
        super().__init__(OrderedDict(layers))


@MODELS.register(_NAME, "lenet-5")
def lenet5(input_shape: tuple[int, ...], n_classes: int, *, conv_relu: bool = False, width: float = 1.0) -> LeNet5:
    """Caffe LeNet-5; ``conv_relu=True`` adds a ReLU after each convolution, ``width`` scales
    the hidden widths."""
    check_type("conv_relu", conv_relu, bool, where=_NAME)
    width = check_number("width", width, where=_NAME, low=0.0, closed="neither")
    return LeNet5(input_shape, n_classes, conv_relu=conv_relu, width=width)
