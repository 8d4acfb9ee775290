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
| ``"N:M"`` (``"2:4"``)| one weight, at most N kept in every M consecutive inputs of a row | Linear-like (not Embedding) |

Groups follow the target's layout (:class:`~prunelab.pruning.targets.Target`): an HF ``Conv1D``
weight is ``(in, out)``, so its unit is a column and its channel a row; a grouped/depthwise conv's
input channel ``j`` is the slice ``j mod (in/g)`` of its own group's filters; MultiheadAttention's
packed ``in_proj_weight`` has q, k, v rows as units, an RNN weight its gate rows. An Embedding is
pruned by single weights only.

Group score reductions: ``l2`` (default; the L2 norm of the member scores, i.e.
the group's weight norm for magnitude), ``sum`` (L1) or ``mean``.

**N:M semi-structured sparsity** (:class:`NMGranularity`, any ``"N:M"`` string with
``0 < N < M``): every output row's inputs are cut into runs of M consecutive inputs, and each
run keeps at most N weights (its N best by score, :func:`nm_keep`). The runs follow the layout
(:func:`nm_view`): a Linear's row, an HF ``Conv1D``'s column; for a convolution, M consecutive
*input channels* at the same kernel position (``W[o, c:c+M, kh, kw]``), the order in which
NVIDIA's sparse tensor cores group a convolution's reduction dimension (channels innermost in
their NHWC implicit GEMM). Each row's input size (a conv's ``in/groups``) must be a multiple of M.
"""

from __future__ import annotations

import re
from numbers import Integral
from typing import cast

import torch

from prunelab._validation import STR, TENSOR, Interval, Types, validate_params
from prunelab.pruning.targets import Target
from prunelab.registry import Registry

GRANULARITIES: Registry[type[Granularity]] = Registry("granularity")
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

    def group_scores(self, scores: torch.Tensor, reduction: str = "l2", target: Target | None = None) -> torch.Tensor:
        view = self.view(scores, target)
        return reduce_scores(view, self.group_dims(view, target), reduction)

    def group_size(self, weight: torch.Tensor, target: Target | None = None) -> int:
        view = self.view(weight, target)
        size = 1
        for d in self.group_dims(view, target):
            size *= view.shape[d]
        return size

    def expand(self, group_mask: torch.Tensor, weight: torch.Tensor, target: Target | None = None) -> torch.Tensor:
        """Broadcast a group mask to the weight's shape."""
        view = self.view(weight, target)
        shape = list(view.shape)
        for d in self.group_dims(view, target):
            shape[d] = 1
        return group_mask.reshape(shape).expand_as(view).reshape(weight.shape)

    def bias_mask(self, group_mask: torch.Tensor) -> torch.Tensor | None:
        return None

    def group_rows(self, weight: torch.Tensor, target: Target | None = None) -> torch.Tensor | None:
        """The output row of each group (shaped like :meth:`group_scores`), for scopes that compare
        groups within a row (``row``); None when a group spans several rows (filter, channel)."""
        return None

    def protected(self, scores: torch.Tensor, alive: torch.Tensor, target: Target | None = None) -> torch.Tensor | None:
        """Groups (shaped like :meth:`group_scores`) that no pruning event may take, whatever
        the scope says; None for none. N:M protects the N best of every run of M."""
        return None

    def resolve_sparsity(self, sparsity, where: str = "Pruner"):
        """The final sparsity this granularity prunes to, from the one asked for (None: its own)."""
        return sparsity

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _rows_like(weight: torch.Tensor, target: Target | None) -> torch.Tensor:
    """Each entry's output row, shaped like ``weight``."""
    axis = _out_axis(target)
    shape = [1] * weight.dim()
    shape[axis] = weight.shape[axis]
    return torch.arange(weight.shape[axis], device=weight.device).reshape(shape).expand(weight.shape)


@GRANULARITIES.register("weight", "unstructured")
class WeightGranularity(Granularity):
    name = "weight"

    def group_rows(self, weight, target=None):
        if target is not None and target.layout == "embedding":
            return None
        return _rows_like(weight, target)


def _structured_only(granularity: str, target: Target, need_conv: bool = False) -> None:
    if target.layout == "embedding":
        raise ValueError(
            f"granularity {granularity!r} does not apply to {target.name!r}, the weight of an Embedding "
            f"(rows are vocabulary entries, not units with inputs); embeddings are pruned with "
            f"granularity='weight' only. Leave {target.name!r} out of 'layers' or use granularity='weight'."
        )
    ok = target.is_conv if need_conv else target.is_structured
    if not ok:
        kinds = (
            "Conv layers"
            if need_conv
            else ("Linear-like layers (Linear, Conv, HF Conv1D, MultiheadAttention and RNN weights)")
        )
        raise ValueError(
            f"granularity {granularity!r} applies only to {kinds}; {target.name!r} is the "
            f"'{target.param_name}' of a {target.kind}. Use granularity='weight' for it, or "
            f"leave it out of 'layers'."
        )


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

    def group_rows(self, weight, target=None):
        rows = torch.arange(weight.shape[0], device=weight.device)[:, None]
        return rows.expand(weight.shape[0], weight.shape[1])


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
    return cast(int, target.module.groups)


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


# --------------------------------------------------------------------------- N:M
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
#: Layouts whose weights have output rows and inputs (N:M runs along the inputs).
NM_LAYOUTS = ("linear", "conv", "transposed", "attention", "recurrent")


class PatternSkipped(UserWarning):
    """Default targets that cannot hold the N:M pattern were left dense (named ones raise)."""


def nm_view(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """``tensor`` (shaped like a weight of ``layout``) as ``(rows, inputs)`` with N:M runs as M
    consecutive columns: HF Conv1D transposed; a conv ``(out, in/g, *k)`` as ``(out, *k, in/g)``
    flattened (input channels innermost, one kernel position after the other); other
    Linear-like weights as they are. Undo with :func:`nm_unview`."""
    if layout == "transposed":
        return tensor.t()
    if layout == "conv" and tensor.dim() > 2:
        return tensor.movedim(1, -1).reshape(tensor.shape[0], -1)
    return tensor.reshape(tensor.shape[0], -1)


def nm_unview(matrix: torch.Tensor, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """The inverse of :func:`nm_view`: ``matrix`` back to a weight of ``shape``."""
    if layout == "transposed":
        return matrix.t()
    if layout == "conv" and len(shape) > 2:
        return matrix.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return matrix.reshape(shape)


def nm_column_order(target: Target) -> torch.Tensor:
    """Column permutation ``perm`` with ``target.matrix()[:, perm] == nm_view(weight)``: in the
    permuted matrix every M consecutive columns are one N:M run (for a solver that works on
    ``target.matrix()`` and wants the runs contiguous; identity except for convs)."""
    weight = target.weight
    ids = torch.arange(weight.numel()).reshape(weight.shape)
    matrix_row = ids.t()[0] if target.layout == "transposed" else ids.reshape(weight.shape[0], -1)[0]
    nm_row = nm_view(ids, target.layout)[0]
    lookup = torch.empty(weight.numel(), dtype=torch.long)
    lookup[matrix_row] = torch.arange(len(matrix_row))
    return lookup[nm_row]


#: The longest N:M run taken (hardware patterns are 1:2, 2:4, 4:8; 1024 leaves room for experiments).
MAX_NM = 1024
_N = Interval(Integral, 1, MAX_NM - 1)
_M = Interval(Integral, 2, MAX_NM)


@validate_params({"scores": [TENSOR], "n": [_N], "m": [_M], "alive": [TENSOR, None]})
def nm_keep(scores: torch.Tensor, n: int, m: int, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask of N:M sparsity: in every run of ``m`` consecutive columns of each row of
    ``scores`` (``(rows, d)``, ``d`` a multiple of ``m``), the ``n`` highest-scored entries that are
    ``alive`` (default: all). Dead entries stay dead, so a run with fewer than ``n`` alive keeps
    fewer. Ties go to the earlier column. Returns a bool tensor shaped like ``scores``."""
    if scores.dim() != 2:
        raise ValueError(f"nm_keep takes scores of shape (rows, inputs). Got shape {tuple(scores.shape)} instead.")
    n, m = int(n), int(m)
    if not 0 < n < m:
        raise ValueError(f"nm_keep needs integers 0 < n < m. Got n={n!r}, m={m!r} instead.")
    rows, d = scores.shape
    if d % m:
        raise ValueError(f"nm_keep: {d} inputs per row is not a multiple of m={m}.")
    s = scores.detach().float().reshape(rows, d // m, m)
    if alive is not None:
        alive = alive.reshape(rows, d // m, m).bool()
        s = s.masked_fill(~alive, float("-inf"))
    best = torch.argsort(s, dim=-1, descending=True, stable=True)[..., :n]
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, best, True)
    if alive is not None:
        keep &= alive
    return keep.reshape(rows, d)


#: The run lengths M that :func:`nm_pattern` tries (those of sparse hardware: 1:2, 2:4, 4:8, ...).
NM_CANDIDATES = (2, 4, 8)


def nm_pattern(tensor: torch.Tensor, layout: str, candidates: tuple[int, ...] = NM_CANDIDATES):
    """The N:M pattern ``(n, m)`` that ``tensor`` (a weight of ``layout``) holds tightly, or None.

    For each ``m`` of ``candidates`` dividing the row's input size, ``n`` is the largest number of
    non-zeros in one run; the pattern holds tightly when ``n < m`` and the runs hold more than
    ``n − 1/2`` non-zeros on average, i.e. most runs are full (a 2:4 layer, not a 95 % unstructured
    one in which no two neighbours survive, "1:2" by accident). Of the tight patterns the sparsest
    (lowest n/m) is returned, the smaller m on ties."""
    if layout not in NM_LAYOUTS or tensor.dim() < 2 or tensor.numel() == 0:
        return None
    matrix = nm_view(tensor.detach(), layout)
    best = None
    for m in candidates:
        if matrix.shape[1] % m:
            continue
        counts = (matrix != 0).reshape(matrix.shape[0], -1, m).sum(dim=-1)
        n = int(counts.max())
        if 0 < n < m and float(counts.float().mean()) > n - 0.5:
            if best is None or n * best[1] < best[0] * m:
                best = (n, m)
    return best


class NMGranularity(Granularity):
    """N:M semi-structured sparsity: at most ``n`` of every ``m`` consecutive input weights of a
    row (see the module docstring for the order). Groups are single weights; what makes it N:M is
    :meth:`protected`: each run's ``n`` best alive weights are out of any event's reach, so a
    prune to ``1 − n/m`` (the only final sparsity it takes) leaves exactly the N:M mask, and
    lower targets of a gradual schedule prune among the other ``m − n`` of each run."""

    prunes_bias = False

    @validate_params({"n": [_N], "m": [_M]}, where="N:M granularity")
    def __init__(self, n: int, m: int):
        self.n, self.m = _check_nm(int(n), int(m))
        self.name = f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        """``1 − n/m``: the fraction of weights an N:M layer has pruned."""
        return 1.0 - self.n / self.m

    def check(self, target: Target) -> None:
        _structured_only(self.name, target)
        reason = self.unfit(target)
        if reason is not None:
            raise ValueError(
                f"granularity {self.name!r} does not apply to {target.name!r} ({target.kind}): {reason}. "
                f"Leave it out of 'layers', or use an M that divides {self._per_position(target)}."
            )

    def unfit(self, target: Target) -> str | None:
        """Why ``target``'s rows cannot be cut into runs of M (None: they can)."""
        per_position = self._per_position(target)
        if per_position % self.m == 0:
            return None
        what = "input channels per group" if target.layout == "conv" else "inputs per output row"
        return f"it has {per_position} {what}, not a multiple of M={self.m}"

    @staticmethod
    def _per_position(target: Target) -> int:
        if target.layout == "conv":
            return target.weight.shape[1]
        return nm_view(target.weight.detach(), target.layout).shape[1]

    def group_rows(self, weight, target=None):
        return _rows_like(weight, target)

    def protected(self, scores, alive, target=None):
        layout = target.layout if target is not None else "linear"
        # the n best alive of each run; a run with fewer alive protects dead ones too (they stay
        # dead through the old mask) so that every run counts exactly n protected entries
        s = nm_view(scores.float().masked_fill(~alive.bool(), float("-inf")), layout)
        keep = nm_keep(s, self.n, self.m)
        return nm_unview(keep, tuple(scores.shape), layout)

    def resolve_sparsity(self, sparsity, where: str = "Pruner"):
        if sparsity is None:
            return self.sparsity
        if isinstance(sparsity, dict) or hasattr(sparsity, "items"):
            raise ValueError(
                f"the 'sparsity' parameter of {where} cannot give per-layer targets with "
                f"granularity {self.name!r}: N:M fixes every layer at {self.sparsity:g}; "
                f"pass sparsity=None and choose the layers with 'layers'."
            )
        if (
            isinstance(sparsity, bool)
            or not isinstance(sparsity, (int, float))
            or abs(float(sparsity) - self.sparsity) > 1e-9
        ):
            raise ValueError(
                f"the 'sparsity' parameter of {where} must be None or {self.sparsity:g} "
                f"(= 1 - {self.n}/{self.m}) with granularity {self.name!r}. Got {sparsity!r} instead."
            )
        return self.sparsity

    def __repr__(self) -> str:
        return f"NMGranularity(n={self.n}, m={self.m})"


def _check_nm(n, m) -> tuple[int, int]:
    ok = isinstance(n, int) and isinstance(m, int) and not isinstance(n, bool) and not isinstance(m, bool) and 0 < n < m
    if not ok:
        raise ValueError(f"an N:M granularity needs integers 0 < N < M. Got N={n!r}, M={m!r} instead.")
    return n, m


def parse_nm(name: object) -> tuple[int, int] | None:
    """``(n, m)`` of an ``"N:M"`` string, or None for anything else."""
    match = _NM.match(name) if isinstance(name, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


@validate_params({"name": [Types(str, Granularity)], "where": [STR]})
def make_granularity(name: str | Granularity, *, where: str = "Pruner") -> Granularity:
    if isinstance(name, Granularity):
        return name
    nm = parse_nm(name)
    if nm is not None:
        if not 0 < nm[0] < nm[1]:
            raise ValueError(
                f"the 'granularity' parameter of {where} must be a name or 'N:M' with "
                f"0 < N < M (e.g. '2:4'). Got {name!r} instead."
            )
        return NMGranularity(*nm)
    try:
        return GRANULARITIES.get(name, param="granularity", where=where)()
    except ValueError as err:
        raise ValueError(f"{err} An N:M pattern is given as 'N:M', e.g. '2:4'.") from None
