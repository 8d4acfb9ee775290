"""Sparsity-inducing regularisers added to the training loss (docs/methods.md §2).

| name          | penalty                                             |
|---------------|-----------------------------------------------------|
| ``l1``        | ``λ Σ |w|``                                         |
| ``l2``        | ``(λ/2) Σ w²`` — its gradient ``λw`` is weight decay ``λ`` |
| ``group-lasso``| ``λ Σ_g √|g| · ‖w_g‖₂`` over the groups of a granularity (Yuan & Lin 2006; filters by default, as in Wen et al. 2016) |

Penalties apply to the prunable weights only (biases and norms are left alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import torch

from prunelab._validation import STR, Interval, Types, validate_params
from prunelab.pruning.granularity import make_granularity
from prunelab.pruning.targets import Target
from prunelab.registry import Registry

REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")


class Regularizer:
    name = ""

    @validate_params({"strength": [Interval(Real, 0, None)]}, where=lambda self: f"{self.name} regularizer")
    def __init__(self, strength: float):
        self.strength = float(strength)

    def bind(self, targets: Sequence[Target]) -> Regularizer:
        """Check the targets suit this regulariser; returns self."""
        return self

    def penalty(self, targets: Sequence[Target]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength:g})"


@REGULARIZERS.register("l1")
class L1(Regularizer):
    name = "l1"

    def penalty(self, targets):
        return self.strength * sum(t.weight.abs().sum() for t in targets)


@REGULARIZERS.register("l2")
class L2(Regularizer):
    name = "l2"

    def penalty(self, targets):
        return 0.5 * self.strength * sum(t.weight.pow(2).sum() for t in targets)


@REGULARIZERS.register("group-lasso", "group_lasso")
class GroupLasso(Regularizer):
    name = "group-lasso"

    @validate_params({"strength": [Interval(Real, 0, None)], "granularity": [STR]}, where="group-lasso regularizer")
    def __init__(self, strength: float, granularity: str = "filter"):
        super().__init__(strength)
        self.granularity = make_granularity(granularity, where="group-lasso regularizer")

    def bind(self, targets):
        for t in targets:
            self.granularity.check(t)
        return self

    def penalty(self, targets):
        total = 0.0
        for t in targets:
            w = self.granularity.view(t.weight, t)  # groups follow the layout (HF Conv1D, grouped convs)
            dims = self.granularity.group_dims(w, t)
            # eps inside the root keeps the gradient finite at groups that are exactly zero
            norms = (w.pow(2).sum(dim=dims) + 1e-12).sqrt() if dims else w.abs()
            total = total + math.sqrt(self.granularity.group_size(t.weight, t)) * norms.sum()
        return self.strength * total

    def __repr__(self) -> str:
        return f"GroupLasso(strength={self.strength:g}, granularity={self.granularity.name!r})"


@validate_params({"spec": [Types(str, Mapping, Regularizer)], "where": [STR]})  # strength: the class's
def make_regularizer(
    spec: str | dict | Regularizer, strength: float | None = None, *, where: str = "fit", **options
) -> Regularizer:
    if strength is not None:
        options["strength"] = strength
    return REGULARIZERS.build(spec, param="regularizer", where=where, instance_of=Regularizer, **options)
