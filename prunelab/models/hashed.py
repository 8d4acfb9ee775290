"""HashedNets (Chen et al. 2015; docs/methods.md §4): layers whose weights share K real parameters.

    layer = HashedLinear(784, 100, compression=1 / 64, seed=3)     # 1225 real weights
    model = prunelab.build_model("mlp", hidden=[100], hashed=1 / 64)  # every Linear/Conv hashed

The virtual weight of a hashed layer is ``V[i, j] = ξ(i, j) · w[h(i, j)]``, where ``i`` is the
output unit (or channel) and ``j`` the flat index of the input entry (for a convolution, of
``(in_channel, kh, kw)``). Both hashes are xxHash32 of the 8-byte key ``(i, j)`` (two little-endian
uint32): ``h = xxh32(key, seed) mod K`` picks the bucket, and ``ξ = +1`` when ``xxh32(key, seed + 1)``
is even, else ``−1``. :func:`xxh32_pairs` computes xxHash32 for all keys at once with numpy; a test
checks it against the ``xxhash`` package.

The buckets are computed once, at construction, and kept as one int32 buffer that also carries
the sign: entry ``c`` selects ``w[c]`` for ``c < K`` and ``−w[c − K]`` otherwise. The forward pass
gathers ``V`` from ``[w, −w]``, and autograd sums the gradients of all virtual entries of a bucket,
with their signs, into that bucket. The index buffer is not saved in the state dict: it follows
from the shape and the seed, so a saved hashed model holds only its K weights and its biases.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from prunelab._validation import MAX_UNITS, MODEL, SEED, Interval, check_number, validate_params

_P1, _P2, _P3, _P4, _P5 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1
_MASK = 0xFFFFFFFF
#: The most virtual weights one hashed layer may have (its int32 index takes 4 bytes each).
MAX_VIRTUAL = 1 << 30
_SIZE = Interval(Integral, 1, MAX_UNITS)
_LAYER: dict[str, list[Any]] = {
    "compression": [Interval(Real, 0, 1, closed="right"), None],
    "buckets": [Interval(Integral, 1, None), None],
    "bias": [bool],
    "seed": [Interval(Integral, 0, _MASK - 1)],
}


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return ((x << np.uint64(r)) | (x >> np.uint64(32 - r))) & np.uint64(_MASK)


def xxh32_pairs(i: np.ndarray, j: np.ndarray, seed: int) -> np.ndarray:
    """xxHash32 of the 8-byte keys ``(i, j)`` (each a little-endian uint32), vectorised:
    equal to ``xxhash.xxh32_intdigest(struct.pack("<II", i, j), seed)`` for every pair."""
    u = np.uint64
    h = np.full(np.broadcast(i, j).shape, (seed + _P5 + 8) & _MASK, dtype=np.uint64)
    for word in (np.asarray(i, dtype=np.uint64), np.asarray(j, dtype=np.uint64)):
        h = (h + word * u(_P3)) & u(_MASK)
        h = (_rotl(h, 17) * u(_P4)) & u(_MASK)
    h ^= h >> u(15)
    h = (h * u(_P2)) & u(_MASK)
    h ^= h >> u(13)
    h = (h * u(_P3)) & u(_MASK)
    h ^= h >> u(16)
    return h.astype(np.uint32)


def hashed_index(rows: int, cols: int, buckets: int, seed: int) -> torch.Tensor:
    """The (rows, cols) int32 index of a hashed layer: ``h(i, j)`` where ``ξ(i, j) = +1``,
    ``K + h(i, j)`` where ``ξ(i, j) = −1``."""
    i, j = np.meshgrid(np.arange(rows, dtype=np.uint64), np.arange(cols, dtype=np.uint64), indexing="ij")
    bucket = xxh32_pairs(i, j, seed) % np.uint32(buckets)
    negative = (xxh32_pairs(i, j, (seed + 1) & _MASK) & np.uint32(1)).astype(bool)
    return torch.from_numpy((bucket.astype(np.int64) + buckets * negative).astype(np.int32))


def n_buckets(virtual: int, compression: float) -> int:
    """K for a layer of ``virtual`` weights at ``compression`` = K / virtual (at least 1)."""
    return max(1, min(virtual, round(compression * virtual)))


class _Gather(torch.autograd.Function):
    """``table[index]`` whose backward sums the gradient into the table with one ``index_add_``
    (autograd's own backward of indexing, an accumulating ``index_put_``, was about twice as
    slow for a 784×100 layer)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.size = table.shape[0]
        return table.index_select(0, index.flatten()).view(index.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        table_grad = grad.new_zeros(ctx.size).index_add_(0, index.flatten(), grad.reshape(-1))
        return table_grad, None


class HashedLayer(nn.Module):
    """Common part of the hashed layers: buckets ``weight`` (K,), optional ``bias``, the index."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    index: torch.Tensor

    def _setup(self, out_units: int, fan_in: int, compression, buckets, seed, bias: bool, where: str) -> None:
        virtual = out_units * fan_in
        if virtual > MAX_VIRTUAL:
            raise ValueError(
                f"{where}: {out_units} × {fan_in} = {virtual} virtual weights, more than the "
                f"{MAX_VIRTUAL} a hashed layer may have."
            )
        if (compression is None) == (buckets is None):
            raise ValueError(
                f"{where} needs exactly one of 'compression' (K / virtual weights, in (0, 1]) "
                f"and 'buckets' (K); got compression={compression!r}, buckets={buckets!r}."
            )
        if buckets is None:
            buckets = n_buckets(virtual, float(compression))
        else:
            buckets = check_number("buckets", buckets, where=where, low=1, high=virtual, integer=True)
        self.seed = int(seed)
        self.buckets = buckets
        self.compression = buckets / virtual
        self.weight = nn.Parameter(torch.empty(buckets))
        self.register_parameter("bias", nn.Parameter(torch.empty(out_units)) if bias else None)
        if torch.get_default_device().type == "meta":  # a shapes-only skeleton (export.load's checks)
            index = torch.empty(out_units, fan_in, dtype=torch.int32)
        else:
            index = hashed_index(out_units, fan_in, buckets, self.seed)
        self.register_buffer("index", index, persistent=False)
        # the virtual weights follow the dense layer's default initialisation, U(±1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def virtual_weight(self) -> torch.Tensor:
        """The (out, fan_in) virtual matrix ``ξ · w[h]`` (differentiable in ``weight``)."""
        return _Gather.apply(torch.cat([self.weight, -self.weight]), self.index)


class HashedLinear(HashedLayer):
    """A Linear layer whose ``in_features × out_features`` weights share K buckets."""

    @validate_params({"in_features": [_SIZE], "out_features": [_SIZE], **_LAYER})
    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        compression: float | None = None,
        buckets: int | None = None,
        bias: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        where = "HashedLinear"
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._setup(self.out_features, self.in_features, compression, buckets, seed, bias, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.virtual_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, buckets={self.buckets}, "
            f"compression={self.compression:.4g}, bias={self.bias is not None}, seed={self.seed}"
        )


class HashedConv2d(HashedLayer):
    """A Conv2d layer whose ``out × in/groups × kh × kw`` weights share K buckets."""

    @validate_params({"in_channels": [_SIZE], "out_channels": [_SIZE], "groups": [_SIZE], **_LAYER})
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        compression: float | None = None,
        buckets: int | None = None,
        bias: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        where = "HashedConv2d"
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{where}: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}."
            )
        pair = nn.modules.utils._pair
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        fan_in = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        self._setup(out_channels, fan_in, compression, buckets, seed, bias, where)

    def virtual_weight(self) -> torch.Tensor:
        return super().virtual_weight().view(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.virtual_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, buckets={self.buckets}, compression={self.compression:.4g}, "
            f"seed={self.seed}"
        )


@validate_params({"model": [MODEL], "compression": [Interval(Real, 0, 1, closed="right")], "seed": [SEED]})
def hash_layers(model: nn.Module, compression: float, seed: int = 0) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (in place) by a hashed layer of
    the same shape at ``compression``; layer k (in ``named_modules`` order) hashes with seed
    ``seed + 2k`` (its sign hash with ``seed + 2k + 1``). Returns ``model``."""
    where = "hash_layers"
    compression, seed = float(compression), int(seed)
    layers = [(name, m) for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    if not layers:
        raise ValueError(f"{where}: {type(model).__name__} has no Linear or Conv2d layer to hash.")
    for k, (name, module) in enumerate(layers):
        layer_seed = (seed + 2 * k) % (_MASK - 1)
        if isinstance(module, nn.Linear):
            new = HashedLinear(
                module.in_features,
                module.out_features,
                compression=compression,
                bias=module.bias is not None,
                seed=layer_seed,
            )
        else:
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(
                    f"{where}: layer {name!r} uses padding {module.padding!r} / padding_mode "
                    f"{module.padding_mode!r}; hashed convolutions support numeric zero padding."
                )
            new = HashedConv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                compression=compression,
                bias=module.bias is not None,
                seed=layer_seed,
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
