"""Granularities: which weights are removed together.

A granularity splits a weight tensor into groups of equal size; a group's score
is the reduction of its members' scores, and a group is kept or pruned whole
(METHODS.md §2).

| name              | group                                   | layers             |
|-------------------|-----------------------------------------|--------------------|
| ``weight``        | one entry                               | any tensor         |
| ``kernel``        | one kh×kw slice ``W[o, i]``             | Conv               |
| ``filter``/``unit``| one output channel/neuron ``W[o]`` + bias | Linear, Conv     |
| ``channel``       | one input channel/feature ``W[:, i]``   | Linear, Conv       |

Group score reductions: ``l2`` (default; the L2 norm of the member scores, i.e.
the group's weight norm for magnitude), ``sum`` (L1) or ``mean``.
"""

from __future__ import annotations

import torch

from prunelab.pruning.targets import Target
from prunelab.registry import Registry

GRANULARITIES: Registry[type["Granularity"]] = Registry("granularity")
REDUCTIONS = ("l2", "sum", "mean")


def reduce_scores(scores: torch.Tensor, dims: tuple[int, ...], reduction: str) -> torch.Tensor:
    if not dims:
        return scores
    if reduction == "l2":
        return scores.pow(2).sum(dim=dims).sqrt()
    if reduction == "sum":
        return scores.sum(dim=dims)
    return scores.mean(dim=dims)


class Granularity:
    """Maps a weight tensor to groups and a group mask back to a weight mask."""

    name = "weight"
    prunes_bias = False

    def check(self, target: Target) -> None:
        """Raise if ``target``'s layer cannot be pruned at this granularity."""

    def group_dims(self, weight: torch.Tensor) -> tuple[int, ...]:
        """Dimensions reduced away to get one score per group."""
        return ()

    def group_scores(self, scores: torch.Tensor, reduction: str = "l2") -> torch.Tensor:
        return reduce_scores(scores, self.group_dims(scores), reduction)

    def group_size(self, weight: torch.Tensor) -> int:
        size = 1
        for d in self.group_dims(weight):
            size *= weight.shape[d]
        return size

    def expand(self, group_mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Broadcast a group mask to the weight's shape."""
        shape = list(weight.shape)
        for d in self.group_dims(weight):
            shape[d] = 1
        return group_mask.reshape(shape).expand_as(weight)

    def bias_mask(self, group_mask: torch.Tensor) -> torch.Tensor | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@GRANULARITIES.register("weight", "unstructured")
class WeightGranularity(Granularity):
    name = "weight"


def _structured_only(granularity: str, target: Target, need_conv: bool = False) -> None:
    ok = target.is_conv if need_conv else target.is_structured
    if not ok:
        kinds = "Conv layers" if need_conv else ("Linear-like layers (Linear, Conv, HF Conv1D, "
                                                   "MultiheadAttention and RNN weights)")
        raise ValueError(
            f"granularity {granularity!r} applies only to {kinds}; {target.name!r} is the "
            f"'{target.param_name}' of a {target.kind}. Use granularity='weight' for it, or "
            f"leave it out of 'layers'.")


@GRANULARITIES.register("kernel")
class KernelGranularity(Granularity):
    """A kh×kw slice ``W[o, i, ...]`` of a convolution."""

    name = "kernel"

    def check(self, target: Target) -> None:
        _structured_only(self.name, target, need_conv=True)

    def group_dims(self, weight: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(2, weight.dim()))


@GRANULARITIES.register("filter", "unit")
class FilterGranularity(Granularity):
    """An output channel (conv filter) or neuron: its incoming weights and its bias."""

    name = "filter"
    prunes_bias = True

    def check(self, target: Target) -> None:
        _structured_only(self.name, target)

    def group_dims(self, weight: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(1, weight.dim()))

    def bias_mask(self, group_mask: torch.Tensor) -> torch.Tensor:
        return group_mask


@GRANULARITIES.register("channel")
class ChannelGranularity(Granularity):
    """An input channel (conv) or input feature (linear): ``W[:, i, ...]``."""

    name = "channel"

    def check(self, target: Target) -> None:
        _structured_only(self.name, target)

    def group_dims(self, weight: torch.Tensor) -> tuple[int, ...]:
        return (0, *range(2, weight.dim()))


def make_granularity(name: "str | Granularity", *, where: str = "Pruner") -> Granularity:
    if isinstance(name, Granularity):
        return name
    return GRANULARITIES.get(name, param="granularity", where=where)()
