"""Multi-layer perceptrons: ``mlp`` and LeNet-300-100.

``mlp`` is a fully connected ReLU network ``D → hidden[0] → … → n_classes``,
the 784-100-10 and 784-30-10 nets of Baktash, Natale & Viennot (2019),
"A comparative study of neural network compression", arXiv:1910.11144.
LeNet-300-100 (LeCun et al. 1998, "Gradient-based learning applied to document
recognition"; the pruning benchmark of Han et al. 2015 and Dong et al. 2017) is
the same family with hidden layers of 300 and 100 units.

Layers: ``flatten``, ``fc1``, ``fc1_relu``, …, ``fcK`` (logits). Inputs may be
images ``(N, C, H, W)`` or flat ``(N, D)``; ``D = C·H·W``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from prunelab.models._layers import check_widths, dense_layers
from prunelab.models.registry import MODELS


class MLP(nn.Sequential):
    """``flatten → fc1 → ReLU → … → fcK``; ``hidden`` are the hidden widths."""

    def __init__(self, in_features: int, hidden: Sequence[int], n_classes: int):
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        layers.update(dense_layers(in_features, hidden, n_classes))
        super().__init__(layers)


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], n_classes: int, *, hidden: Sequence[int] = (100,)) -> MLP:
    """Fully connected ReLU net; ``hidden=[100]`` is 784-100-10 on MNIST, ``[]`` is softmax regression."""
    widths = check_widths("hidden", hidden, where="mlp")
    return MLP(math.prod(input_shape), widths, n_classes)


@MODELS.register("lenet-300-100", "lenet_300_100")
def lenet_300_100(input_shape: tuple[int, ...], n_classes: int) -> MLP:
    """LeNet-300-100: 784-300-100-10 (266,610 parameters on MNIST)."""
    return MLP(math.prod(input_shape), [300, 100], n_classes)
