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

from collections.abc import Callable, Sequence

import torch

from prunelab._hooks import eval_mode

from prunelab._validation import check_number
from prunelab.inputs import Batch, Loss, as_batch, make_loss
from prunelab.pruning.targets import Target
from prunelab.registry import Registry

CRITERIA: Registry[type["Criterion"]] = Registry("criterion")


class Criterion:
    """Base class. Subclasses set ``name`` and implement :meth:`scores`.

    ``needs_gradients``: the criterion can use the training gradients the Pruner's
    optimiser hook passes to :meth:`observe`. ``needs_data``: it computes statistics
    from calibration batches in :meth:`calibrate` (the Pruner calls it before every
    prune when given ``calibration=``). ``updates_weights``: a *solver* — instead of
    scores, :meth:`solve` sets the pruned and compensated weights itself (L-OBS).
    """

    name = ""
    needs_gradients = False
    needs_data = False
    updates_weights = False
    default_scope = "local"      # the scope a Pruner given scope=None uses (Wanda: "row")

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        raise NotImplementedError

    def validate(self, pruner) -> None:
        """Check this criterion suits the Pruner's targets, granularity and scope (called
        when the Pruner is built, before any training)."""

    def observe(self, targets: Sequence[Target]) -> None:
        """Record the current gradients (called after backward, before the step)."""

    def calibrate(self, model: torch.nn.Module, targets: Sequence[Target], batches: list,
                  loss_fn: Callable) -> None:
        """Accumulate statistics over calibration ``batches`` (:class:`prunelab.inputs.Batch`);
        ``loss_fn(output, batch)`` is a :class:`prunelab.inputs.Loss`."""
        raise NotImplementedError(f"criterion {self.name!r} uses no calibration data")

    def reset(self) -> None:
        """Forget recorded statistics (called after every prune)."""

    def _calibration(self, batches, loss_fn) -> tuple[list[Batch], Loss]:
        """The batches as :class:`Batch` es and the loss as a :class:`Loss`, whatever form a direct
        caller of :meth:`calibrate` used (``(x, y)`` pairs and ``F.cross_entropy`` included)."""
        where = f"{self.name} criterion"
        return ([as_batch(b, where=where, index=i) for i, b in enumerate(batches)],
                make_loss(loss_fn, where=where))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@CRITERIA.register("magnitude")
class Magnitude(Criterion):
    """Weight magnitude ``|w|`` (Han et al. 2015)."""

    name = "magnitude"

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        return [t.weight.detach().abs() for t in targets]


@CRITERIA.register("random")
class Random(Criterion):
    """Uniform random scores from a generator seeded with ``seed``.

    Each call draws fresh scores, so successive prunes of an iterative schedule
    are independent draws, and the whole sequence is reproducible from the seed.
    """

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = check_number("seed", seed, where="random criterion", low=0, integer=True)
        self._generator = torch.Generator().manual_seed(self.seed)

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        return [torch.rand(t.weight.shape, generator=self._generator).to(t.weight.device)
                for t in targets]

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

    def __init__(self, window: int | None = None):
        if window is not None:
            window = check_number("window", window, where="gradient criterion", low=1, integer=True)
        self.window = window
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
            raise ValueError(f"gradient criterion: no gradient for {', '.join(missing)}; "
                             f"call loss.backward() before observing.")
        products = [(t.weight.detach() * g).abs_() for t, g in zip(targets, grads)]
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
        frozen = [p for p in params if not p.requires_grad]    # dL/dw exists for a frozen weight too
        for p in frozen:
            p.requires_grad_(True)
        try:
            with eval_mode(model):
                for batch in batches:
                    grads = torch.autograd.grad(loss_fn(batch.call(model), batch), params, allow_unused=True)
                    missing = [t.name for t, g in zip(targets, grads) if g is None]
                    if missing:
                        raise ValueError(f"gradient criterion: the loss does not depend on {', '.join(missing)} "
                                         f"(the forward pass never uses them); leave them out of 'layers'.")
                    for p, g in zip(params, grads):
                        p.grad = g
                    self.observe(targets)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            for p in frozen:
                p.requires_grad_(False)

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        if self._sums is None or self._count == 0:
            raise ValueError(
                "the gradient criterion has no gradients to score with: attach an optimiser "
                "(Pruner(..., optimizer=opt) or pruner.attach(opt)), call pruner.observe_gradients() "
                "after loss.backward(), or pass calibration data.")
        return [s / self._count for s in self._sums]

    def reset(self) -> None:
        self._sums = None
        self._count = 0

    def __repr__(self) -> str:
        return f"GradientMagnitude(window={self.window})"


def make_criterion(spec: "str | Criterion | dict", *, seed: int = 0, where: str = "Pruner") -> Criterion:
    """Build a criterion from a name (``"magnitude"``), a dict ``{"name": ..., **options}``,
    or return an instance unchanged. ``seed`` reaches criteria that take one."""
    return CRITERIA.build(spec, param="criterion", where=where, defaults={"seed": seed}, instance_of=Criterion)
