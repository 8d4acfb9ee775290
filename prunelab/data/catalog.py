"""The dataset registry: every name ``load_dataset`` accepts, mapped to its source."""

from __future__ import annotations

from prunelab.data.cifar import CIFAR10
from prunelab.data.digits import DIGITS
from prunelab.data.mnist import FASHION_MNIST, MNIST
from prunelab.data.source import DatasetSource
from prunelab.data.text import PTB, PYDOCS, WIKITEXT2
from prunelab.data.variants import MNIST_BACK_IMAGE, MNIST_BACK_RAND, MNIST_ROT
from prunelab.registry import Registry

DATASETS: Registry[DatasetSource] = Registry("dataset")

for _source in (
    DIGITS,
    MNIST,
    FASHION_MNIST,
    MNIST_ROT,
    MNIST_BACK_RAND,
    MNIST_BACK_IMAGE,
    CIFAR10,
    PYDOCS,
    PTB,
    WIKITEXT2,
):
    DATASETS.register(_source.name)(_source)
del _source
