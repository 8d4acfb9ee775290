"""Saliency criteria: a score per weight, lowest pruned first (docs/methods.md §1).

A criterion returns one score tensor per target, shaped like its weight. Scores
of different layers are compared directly under global scope, so a criterion's
scores must mean the same thing in every layer.

| name        | score                                                    |
|-------------|----------------------------------------------------------|
| ``magnitude`` | ``|w|``                                                |
| ``random``    | uniform in [0, 1), from a seeded generator             |
| ``gradient``  | ``mean |w · g|`` over the batches observed before the prune |

Second-order criteria (OBD, L-OBS) and Wanda (``|w| · ‖x‖₂``) live in their own modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Integral
from typing import TYPE_CHECKING, cast

import torch

from prunelab._hooks import eval_mode
from prunelab._validation import MAX_STEPS, SEED, STR, Interval, Types, validate_params
from prunelab.inputs import Batch, Loss, as_batch, make_loss
from prunelab.pruning.targets import Target
from prunelab.registry import Registry

if TYPE_CHECKING:
    from prunelab.pruning.problems import PruneSetting

CRITERIA: Registry[type[Criterion]] = Registry("criterion")


class Criterion:
    """Base class. Subclasses set ``name`` and implement :meth:`scores`.

    ``needs_gradients``: the criterion can use the training gradients the Pruner's
    optimiser hook passes to :meth:`observe`. ``needs_data``: it computes statistics
    from calibration batches in :meth:`calibrate` (the Pruner calls it before every
    prune when given ``calibration=``). ``updates_weights``: a *solver* — instead of
    scores, :meth:`solve` sets the pruned and compensated weights itself (L-OBS).
    A solver is given a :class:`prunelab.pruning.problems.SolveRequest`, never the Pruner: the
    scope's :meth:`~prunelab.pruning.scopes.Scope.allocate` says which layers the event raises and
    to what sparsity, and each layer is a :class:`~prunelab.pruning.problems.LayerProblem`.
    """

    name = ""
    needs_gradients = False
    needs_data = False
    updates_weights = False
    default_scope = "local"  # the scope a Pruner given scope=None uses (Wanda: "row")

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        raise NotImplementedError

    def iter_scores(self, targets: Sequence[Target]) -> Iterator[torch.Tensor]:
        """Each target's scores in turn, as :meth:`scores` gives them. The Pruner scores through
        this, one layer at a time; a criterion that can score one layer alone overrides it so
        that only one layer's scores exist at once (this default computes them all first)."""
        yield from self.scores(targets)

    def solve(self, request) -> list[torch.Tensor]:
        """A solver (``updates_weights``): prune and update the weights for one event given as a
        :class:`~prunelab.pruning.problems.SolveRequest`; return one bool keep-mask per
        ``request.targets`` (in the weight's shape) and set ``last_held`` to the names of the
        layers the no-empty-layer guard held."""
        raise NotImplementedError(f"criterion {self.name!r} prunes by scores, not as a solver")

    def validate(self, setting: PruneSetting) -> None:
        """Check this criterion suits the targets, granularity, scope and schedule of the
        :class:`~prunelab.pruning.problems.PruneSetting` (called when the Pruner is built, before any
        training); raise ValueError naming what does not fit."""

    def observe(self, targets: Sequence[Target]) -> None:
        """Record the current gradients (called after backward, before the step)."""

    def calibrate(self, model: torch.nn.Module, targets: Sequence[Target], batches: list, loss_fn: Callable) -> None:
        """Accumulate statistics over calibration ``batches`` (:class:`prunelab.inputs.Batch`);
        ``loss_fn(output, batch)`` is a :class:`prunelab.inputs.Loss`."""
        raise NotImplementedError(f"criterion {self.name!r} uses no calibration data")

    def reset(self) -> None:
        """Forget recorded statistics (called after every prune)."""

    def _calibration(self, batches, loss_fn) -> tuple[list[Batch], Loss]:
        """The batches as :class:`Batch` es and the loss as a :class:`Loss`, whatever form a direct
        caller of :meth:`calibrate` used (``(x, y)`` pairs and ``F.cross_entropy`` included)."""
        where = f"{self.name} criterion"
        return ([as_batch(b, where=where, index=i) for i, b in enumerate(batches)], make_loss(loss_fn, where=where))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@CRITERIA.register("magnitude")
class Magnitude(Criterion):
    """Weight magnitude ``|w|`` (Han et al. 2015)."""

    name = "magnitude"

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        return [t.weight.detach().abs() for t in targets]

    def iter_scores(self, targets):
        for t in targets:
            yield t.weight.detach().abs()


@CRITERIA.register("random")
class Random(Criterion):
    """Uniform random scores from a generator seeded with ``seed``.

    Each call draws fresh scores, so successive prunes of an iterative schedule
    are independent draws, and the whole sequence is reproducible from the seed.
    """

    name = "random"

    @validate_params({"seed": [SEED]}, where="random criterion")
    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        return list(self.iter_scores(targets))

    def iter_scores(self, targets):
        for t in targets:  # the same draws in the same order as all at once
            yield torch.rand(t.weight.shape, generator=self._generator).to(t.weight.device)

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"


@CRITERIA.register("gradient", "gradient-magnitude")
class GradientMagnitude(Criterion):
    """Gradient magnitude ``|w · g|``, averaged over observed batches.

    ``g = dL/dw`` is taken from ``weight.grad`` each time :meth:`observe` runs (the
    Pruner calls it from its optimiser hook, or from a calibration pass). The score
    is the mean of ``|w · g|`` over the batches observed since the last prune; with
    ``window=N`` the Pruner observes only the last N training steps before each
    scheduled prune.
    """

    name = "gradient"
    needs_gradients = True
    needs_data = True

    @validate_params({"window": [Interval(Integral, 1, MAX_STEPS), None]}, where="gradient criterion")
    def __init__(self, window: int | None = None):
        self.window = None if window is None else int(window)
        self._sums: list[torch.Tensor] | None = None
        self._count = 0

    @property
    def n_observed(self) -> int:
        return self._count

    @torch.no_grad()
    def observe(self, targets: Sequence[Target]) -> None:
        grads = [t.weight.grad for t in targets]
        if any(g is None for g in grads):
            missing = [t.name for t, g in zip(targets, grads) if g is None]
            raise ValueError(
                f"gradient criterion: no gradient for {', '.join(missing)}; call loss.backward() before observing."
            )
        products = [(t.weight.detach() * cast(torch.Tensor, g)).abs_() for t, g in zip(targets, grads)]
        if self._sums is None:
            self._sums = products
        else:
            torch._foreach_add_(self._sums, products)
        self._count += 1

    def calibrate(self, model, targets, batches, loss_fn) -> None:
        """Observe ``dL/dw`` of each calibration batch (model in eval mode, ``.grad`` untouched).
        Batches in any form :mod:`prunelab.inputs` reads (tensors, tuples, dicts of keyword inputs),
        any output (tensor, tuple, dict, ``ModelOutput``); the loss is the user's ``loss_fn`` or the
        cross-entropy inferred from the logits' shape (classes, or tokens with next-token targets)."""
        batches, loss_fn = self._calibration(batches, loss_fn)
        params = [t.weight for t in targets]
        saved = [p.grad for p in params]
        frozen = [p for p in params if not p.requires_grad]  # dL/dw exists for a frozen weight too
        for p in frozen:
            p.requires_grad_(True)
        try:
            with eval_mode(model):
                for batch in batches:
                    grads = torch.autograd.grad(loss_fn(batch.call(model), batch), params, allow_unused=True)
                    missing = [t.name for t, g in zip(targets, grads) if g is None]
                    if missing:
                        raise ValueError(
                            f"gradient criterion: the loss does not depend on {', '.join(missing)} "
                            f"(the forward pass never uses them); leave them out of 'layers'."
                        )
                    for p, g in zip(params, grads):
                        p.grad = g
                    self.observe(targets)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            for p in frozen:
                p.requires_grad_(False)

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        return list(self.iter_scores(targets))

    def iter_scores(self, targets):
        if self._sums is None or self._count == 0:
            raise ValueError(
                "the gradient criterion has no gradients to score with: attach an optimiser "
                "(Pruner(..., optimizer=opt) or pruner.attach(opt)), call pruner.observe_gradients() "
                "after loss.backward(), or pass calibration data."
            )
        for s in self._sums:
            yield s / self._count

    def reset(self) -> None:
        self._sums = None
        self._count = 0

    def __repr__(self) -> str:
        return f"GradientMagnitude(window={self.window})"


def score_stream(criterion: Criterion, targets: Sequence[Target]) -> Iterator[torch.Tensor]:
    """``criterion.iter_scores(targets)``, unless a subclass overrides :meth:`Criterion.scores`
    below the class that gives its ``iter_scores`` (then that ``scores``, which it means to be used)."""
    mro = type(criterion).__mro__
    scores_from = next(c for c in mro if "scores" in c.__dict__)
    stream_from = next(c for c in mro if "iter_scores" in c.__dict__)
    if scores_from is not stream_from and issubclass(scores_from, stream_from):
        return iter(criterion.scores(targets))
    return criterion.iter_scores(targets)


@validate_params({"spec": [Types(str, Criterion, Mapping)], "seed": [SEED], "where": [STR]})
def make_criterion(spec: str | Criterion | dict, *, seed: int = 0, where: str = "Pruner") -> Criterion:
    """Build a criterion from a name (``"magnitude"``), a dict ``{"name": ..., **options}``,
    or return an instance unchanged. ``seed`` reaches criteria that take one."""
    return CRITERIA.build(spec, param="criterion", where=where, defaults={"seed": seed}, instance_of=Criterion)
