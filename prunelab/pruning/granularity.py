"""Granularities: which weights are removed together.

A granularity splits a weight tensor into groups of equal size; a group's score
is the reduction of its members' scores, and a group is kept or pruned whole
(docs/methods.md §2).

| name              | group                                   | layers             |
|-------------------|-----------------------------------------|--------------------|
| ``weight``        | one entry                               | any tensor         |
| ``kernel``        | one kh×kw slice ``W[o, i]``             | Conv               |
| ``filter``/``unit``| one output channel/neuron ``W[o]`` + bias | Linear-like (not Embedding) |
| ``channel``       | one input channel/feature ``W[:, i]``   | Linear-like (not Embedding) |

Groups follow the target's layout (:class:`~prunelab.pruning.targets.Target`): an HF ``Conv1D``
weight is ``(in, out)``, so its unit is a column and its channel a row; a grouped/depthwise conv's
input channel ``j`` is the slice ``j mod (in/g)`` of its own group's filters; MultiheadAttention's
packed ``in_proj_weight`` has q, k, v rows as units, an RNN weight its gate rows. An Embedding is
pruned by single weights only.

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
    """Maps a weight tensor to groups and a group mask back to a weight mask.

    Every method takes the :class:`Target` (optional: without it a weight is read as
    ``(out, in, *kernel)``) so that a group follows the target's layout: HF ``Conv1D``
    weights are ``(in, out)`` (``Target.out_axis`` = 1), a grouped convolution's input
    channels are spread over its groups. A subclass reshapes the tensor with :meth:`view`
    and names the dimensions reduced away with :meth:`group_dims`.
    """

    name = "weight"
    prunes_bias = False

    def check(self, target: Target) -> None:
        """Raise if ``target``'s layer cannot be pruned at this granularity."""

    def view(self, tensor: torch.Tensor, target: Target | None = None) -> torch.Tensor:
        """``tensor`` (shaped like the weight) reshaped so that groups are whole dimensions."""
        return tensor

    def group_dims(self, weight: torch.Tensor, target: Target | None = None) -> tuple[int, ...]:
        """Dimensions of :meth:`view` reduced away to get one score per group."""
        return ()

    def group_scores(self, scores: torch.Tensor, reduction: str = "l2",
                     target: Target | None = None) -> torch.Tensor:
        view = self.view(scores, target)
        return reduce_scores(view, self.group_dims(view, target), reduction)

    def group_size(self, weight: torch.Tensor, target: Target | None = None) -> int:
        view = self.view(weight, target)
        size = 1
        for d in self.group_dims(view, target):
            size *= view.shape[d]
        return size

    def expand(self, group_mask: torch.Tensor, weight: torch.Tensor,
               target: Target | None = None) -> torch.Tensor:
        """Broadcast a group mask to the weight's shape."""
        view = self.view(weight, target)
        shape = list(view.shape)
        for d in self.group_dims(view, target):
            shape[d] = 1
        return group_mask.reshape(shape).expand_as(view).reshape(weight.shape)

    def bias_mask(self, group_mask: torch.Tensor) -> torch.Tensor | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@GRANULARITIES.register("weight", "unstructured")
class WeightGranularity(Granularity):
    name = "weight"


def _structured_only(granularity: str, target: Target, need_conv: bool = False) -> None:
    if target.layout == "embedding":
        raise ValueError(
            f"granularity {granularity!r} does not apply to {target.name!r}, the weight of an Embedding "
            f"(rows are vocabulary entries, not units with inputs); embeddings are pruned with "
            f"granularity='weight' only. Leave {target.name!r} out of 'layers' or use granularity='weight'.")
    ok = target.is_conv if need_conv else target.is_structured
    if not ok:
        kinds = "Conv layers" if need_conv else ("Linear-like layers (Linear, Conv, HF Conv1D, "
                                                   "MultiheadAttention and RNN weights)")
        raise ValueError(
            f"granularity {granularity!r} applies only to {kinds}; {target.name!r} is the "
            f"'{target.param_name}' of a {target.kind}. Use granularity='weight' for it, or "
            f"leave it out of 'layers'.")


def _out_axis(target: Target | None) -> int:
    return target.out_axis if target is not None else 0


@GRANULARITIES.register("kernel")
class KernelGranularity(Granularity):
    """A kh×kw slice ``W[o, i, ...]`` of a convolution."""

    name = "kernel"

    def check(self, target: Target) -> None:
        _structured_only(self.name, target, need_conv=True)

    def group_dims(self, weight, target=None):
        return tuple(range(2, weight.dim()))


@GRANULARITIES.register("filter", "unit")
class FilterGranularity(Granularity):
    """An output channel (conv filter) or neuron: its incoming weights and its bias. For an HF
    ``Conv1D`` (weight ``(in, out)``) a unit is a column; for MultiheadAttention's packed
    ``in_proj_weight`` a row of q, k or v (with its ``in_proj_bias`` entry); for an RNN weight a
    gate row (with its ``bias_ih``/``bias_hh`` entry of the same tensor pair)."""

    name = "filter"
    prunes_bias = True

    def check(self, target: Target) -> None:
        _structured_only(self.name, target)

    def group_dims(self, weight, target=None):
        out_axis = _out_axis(target)
        return tuple(d for d in range(weight.dim()) if d != out_axis)

    def bias_mask(self, group_mask: torch.Tensor) -> torch.Tensor:
        return group_mask


def _conv_groups(target: Target | None) -> int:
    if target is None or target.layout != "conv":
        return 1
    return target.module.groups


@GRANULARITIES.register("channel")
class ChannelGranularity(Granularity):
    """An input channel (conv) or input feature (linear): ``W[:, i, ...]`` (``W[i]`` for an HF
    ``Conv1D``). In a grouped convolution (``groups`` = g, weight ``(out, in/g, *k)``) input channel
    ``j`` of group ``j // (in/g)`` is read only by that group's filters: its weights are
    ``W[group's filters, j mod (in/g)]``, so each of the ``in`` channels is one group of
    ``out/g · kernel`` weights (in a depthwise conv, channel ``j`` is filter ``j``'s kernel(s))."""

    name = "channel"

    def check(self, target: Target) -> None:
        _structured_only(self.name, target)

    def view(self, tensor, target=None):
        groups = _conv_groups(target)
        if groups == 1:
            return tensor
        # (out, in/g, *k) -> (g, out/g, in/g, *k): groups × channels-per-group are the input channels
        return tensor.reshape(groups, tensor.shape[0] // groups, *tensor.shape[1:])

    def group_dims(self, weight, target=None):
        if _conv_groups(target) > 1:
            return (1, *range(3, weight.dim()))
        if _out_axis(target) == 1:
            return (1,)
        return (0, *range(2, weight.dim()))


def make_granularity(name: "str | Granularity", *, where: str = "Pruner") -> Granularity:
    if isinstance(name, Granularity):
        return name
    return GRANULARITIES.get(name, param="granularity", where=where)()
