"""The Pruner: criterion × granularity × scope × schedule, driven from a training loop.

    pruner = Pruner(model, 0.9, criterion="magnitude", scope="global",
                    schedule="agp", schedule_args={"n_prunes": 10, "every": 100},
                    optimizer=opt)
    for x, y in batches:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        pruner.step()          # prunes when the schedule says so

Pruning is in place: pruned weights are set to exactly 0.0 in the model's own
tensors, so the result is already permanent — there is nothing to "remove".
The masks live in the Pruner and matter only while training goes on: attached
to an optimiser they keep pruned entries at zero (see :mod:`masks`).
:func:`prune` is the one-call form for one-shot pruning.

Memory: under a scope that decides each layer alone (``local``, ``row``,
``layerwise-constant``) the Pruner asks the criterion for one layer's scores at a time
(:meth:`Criterion.iter_scores`), selects, and keeps only that layer's bool mask (1 byte per
weight) before the next; ``global`` keeps every layer's group scores for its one ranking.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import cast

import torch
from torch import nn

from prunelab._model_checks import check_batch_fits, check_materialised
from prunelab._validation import (
    BATCH_SIZE,
    DATA,
    MAPPING,
    MAX_STEPS,
    MODEL,
    SEED,
    SPARSITY,
    Interval,
    Options,
    Types,
    check_finite,
    check_number,
    check_sparsity,
    validate_params,
)
from prunelab.inputs import iter_batches, make_loss
from prunelab.pruning.criteria import Criterion, make_criterion, score_stream
from prunelab.pruning.granularity import REDUCTIONS, Granularity, NMGranularity, PatternSkipped, make_granularity
from prunelab.pruning.masks import MaskSet, OptimizerHooks
from prunelab.pruning.problems import PruneSetting, SolveRequest
from prunelab.pruning.schedules import Schedule, make_schedule
from prunelab.pruning.scopes import Event, LayerGroups, Scope, make_scope
from prunelab.pruning.targets import Target, resolve_targets

Batches = Iterable  # (x, y) pairs, input tensors, dicts of keyword inputs: see prunelab.inputs

#: What Pruner and prune declare alike (a larger ``min_keep`` than a layer has keeps the layer whole:
#: no upper bound).
_COMMON: dict[str, list] = {
    "model": [MODEL],
    "sparsity": [SPARSITY, MAPPING, None],
    "criterion": [Types(str, Mapping, Criterion)],
    "granularity": [Types(str, Granularity)],
    "scope": [Types(str, Scope), None],
    "reduction": [Options(REDUCTIONS)],
    "min_keep": [Interval(Integral, 1, None)],
    "loss_fn": ["callable", None],
    "output_key": [str, None],
    "seed": [SEED],
}


class SparsityShortfall(UserWarning):
    """The no-empty-layer guard (``min_keep``) stopped some layers short of their target."""


@dataclass(frozen=True)
class PruneRecord:
    """One applied pruning event."""

    step: int
    target: float  # the schedule's sparsity
    sparsity: float  # realised sparsity over all targets afterwards
    layers: dict  # per-target realised sparsity
    report: object = None  # a solver's per-layer report (L-OBS), if any
    held: tuple = ()  # targets the no-empty-layer guard kept from going lower (see Pruner)


class Pruner:
    """Prunes ``model``'s prunable weights to ``sparsity`` on a schedule.

    Parameters
    ----------
    model: the network; its weights are modified in place.
    sparsity: final fraction of prunable weights removed, in [0, 1). May be omitted
        when ``schedule`` is a ready :class:`Schedule` (which carries it).
    criterion: ``"magnitude"``, ``"random"``, ``"gradient"``, ``"wanda"``, ``"obd"``, ... (or a
        Criterion, or a ``{"name": ..., **options}`` dict).
    granularity: ``"weight"``, ``"kernel"``, ``"filter"``/``"unit"``, ``"channel"``, or an N:M
        pattern ``"2:4"`` (then ``sparsity`` is None or exactly ``1 − N/M``).
    scope: ``"local"``, ``"global"``, ``"layerwise-constant"``, ``"row"`` (every output row to the
        sparsity); None (default): the criterion's own — ``row`` for Wanda, ``local`` otherwise.
    schedule: ``"one-shot"``, ``"iterative"``, ``"agp"``, ``"fixed-fraction"``, a
        Schedule, or a callable ``step -> sparsity``; ``schedule_args`` are its options
        (e.g. ``{"n_prunes": 5, "every": 100, "exponent": 3}``).
    layers: module or parameter names to prune (default: every Linear/Conv weight).
    reduction: how member scores make a group score: ``"l2"``, ``"sum"``, ``"mean"``.
    min_keep: groups that always survive in every layer (no layer is emptied). When this
        guard stops a layer short of what the scope asked, the event's record lists it in
        ``held`` and a :class:`SparsityShortfall` warning gives the realised sparsity.
    optimizer: optimiser(s) to keep masks enforced in (see :meth:`attach`).
    rewind: lottery-ticket rewinding (Frankle & Carbin 2018): after every prune,
        reset all parameters to their values at construction (``"init"``), after
        training step ``k`` (an int), or to a given ``{name: tensor}`` snapshot of the
        model's parameters, keeping the masks; optimiser state is reset.
    seed: seeds the random criterion.
    """

    @validate_params(
        {
            **_COMMON,
            "schedule": [Types(str, dict, Schedule), "callable"],
            "schedule_args": [MAPPING, None],
            "calibration": [DATA, None],
            "calibration_batch_size": [BATCH_SIZE],
        }
    )
    def __init__(
        self,
        model: nn.Module,
        sparsity: float | None = None,
        *,
        criterion: str | dict | Criterion = "magnitude",
        granularity: str | Granularity = "weight",
        scope: str | Scope | None = None,
        schedule: str | dict | Schedule | Callable[[int], float] = "one-shot",
        schedule_args: dict | None = None,
        layers: Iterable[str] | None = None,
        reduction: str = "l2",
        min_keep: int = 1,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        rewind: str | int | Mapping | None = None,
        calibration: tuple[torch.Tensor, torch.Tensor] | Batches | None = None,
        loss_fn: Callable | None = None,
        calibration_batch_size: int = 256,
        output_key: str | None = None,
        seed: int = 0,
    ):
        where = "Pruner"
        self.model = model
        self.targets: list[Target] = _non_empty(resolve_targets(model, layers, where=where), layers is not None)
        check_materialised(model, where)
        self.criterion = make_criterion(criterion, seed=seed, where=where)
        self.granularity = make_granularity(granularity, where=where)
        self.pattern_skipped = self._check_granularity(layers is not None)
        _check_tied_embeddings(model, self.targets, self.granularity)
        self.scope = make_scope(self._default_scope() if scope is None else scope, where=where)
        self._check_rows()
        self.reduction = reduction
        self.min_keep = int(min_keep)
        self.layer_targets = None
        sparsity = self.granularity.resolve_sparsity(sparsity, where)  # N:M: None or exactly 1 − N/M
        if isinstance(sparsity, Mapping):
            self.layer_targets = self._layer_targets(sparsity)
            if self.scope.name == "global":
                raise ValueError(
                    "per-layer sparsity targets need scope 'local' or 'layerwise-constant'; "
                    "'global' chooses each layer's sparsity itself."
                )
            sparsity = self._overall(self.layer_targets)
        self.schedule = self._make_schedule(schedule, sparsity, schedule_args or {})
        self.loss_fn = loss_fn
        self.loss = make_loss(loss_fn, output_key, where=where)
        self.calibration_batch_size = int(calibration_batch_size)
        if calibration is not None and not _is_sliceable(calibration) and not torch.is_tensor(calibration):
            if isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes, Mapping)):
                calibration = list(calibration)  # used at every prune: an iterator would run dry
        if calibration is not None:  # refuse an empty or malformed calibration set now, before any training
            list(iter_batches(calibration, self.calibration_batch_size, where=where))
        self.calibration = calibration
        self.layers_named = layers is not None  # solvers skip unsupported default targets, refuse named ones
        self.criterion.validate(
            PruneSetting(self.model, self.targets, self.granularity, self.scope, self.schedule, self.layers_named)
        )
        if calibration is not None and self.criterion.needs_data:  # one example through the model, now
            with torch.random.fork_rng(devices=[]):  # a shuffling DataLoader draws a seed
                first = next(iter_batches(calibration, self.calibration_batch_size, where=where))
            check_batch_fits(
                model,
                first,
                "the calibration batches of Pruner (the 'data' of prune)",
                self.loss if self.criterion.needs_gradients else None,
            )
        self._events = self.schedule.events()
        self._next_event = 0
        self.step_count = 0
        self.history: list[PruneRecord] = []
        self.masks = MaskSet()
        self._hooks: list[OptimizerHooks] = []
        self._rewind_step, self._snapshot = self._init_rewind(rewind)
        if optimizer is not None:
            # not a list or tuple: one optimiser (attach() checks it is one)
            for opt in optimizer if isinstance(optimizer, (list, tuple)) else [cast(torch.optim.Optimizer, optimizer)]:
                self.attach(opt)

    # ----------------------------------------------------------------- set-up
    def _check_granularity(self, named: bool) -> dict[str, str]:
        """Every target must take the granularity. Under an N:M pattern, default targets that
        cannot (e.g. a first conv with 3 input channels) are left dense with a warning and
        returned as ``{layer: reason}``; named ones raise, as do all others."""
        skipped = {}
        if not named and isinstance(self.granularity, NMGranularity):
            skipped = {t.name: reason for t in self.targets if (reason := self.granularity.unfit(t)) is not None}
        for target in self.targets:
            if target.name not in skipped or len(skipped) == len(self.targets):
                self.granularity.check(target)  # no layer can hold the pattern: the first one's error
        if skipped:
            self.targets = [t for t in self.targets if t.name not in skipped]
            warnings.warn(
                PatternSkipped(
                    f"granularity {self.granularity.name!r} leaves {len(skipped)} layer(s) dense: "
                    + "; ".join(f"{k} ({v})" for k, v in skipped.items())
                    + ". Listed in pruner.pattern_skipped."
                ),
                stacklevel=4,
            )  # past __init__ and its declaration check
        return skipped

    def _default_scope(self) -> str:
        """The criterion's own scope (``row`` for Wanda, else ``local``), or ``local`` when the
        granularity's groups do not lie in one output row."""
        preferred = getattr(self.criterion, "default_scope", "local")
        if preferred == "row" and not self._has_rows():
            return "local"
        return preferred

    def _has_rows(self, target: Target | None = None) -> bool:
        chosen = self.targets if target is None else [target]
        return all(self.granularity.group_rows(t.weight, t) is not None for t in chosen)

    def _check_rows(self) -> None:
        if not getattr(self.scope, "needs_rows", False):
            return
        for target in self.targets:
            if not self._has_rows(target):
                raise ValueError(
                    f"scope {self.scope.name!r} compares groups within an output row, and "
                    f"granularity {self.granularity.name!r} has groups spanning rows in "
                    f"{target.name!r} ({target.kind}); use granularity 'weight', 'kernel' or "
                    f"'N:M', or scope 'local'."
                )

    @staticmethod
    def _make_schedule(schedule, sparsity, schedule_args) -> Schedule:
        if isinstance(schedule, Schedule):
            if schedule_args:
                raise ValueError(
                    "the 'schedule_args' parameter of Pruner applies to a schedule "
                    "given by name; this schedule is already built."
                )
            if (
                sparsity is not None
                and abs(check_sparsity("sparsity", sparsity, where="Pruner") - schedule.final_sparsity) > 1e-12
            ):
                raise ValueError(
                    f"the 'sparsity' parameter of Pruner ({sparsity!r}) disagrees with "
                    f"the schedule's final sparsity ({schedule.final_sparsity!r}); "
                    f"give one of them."
                )
            return schedule
        if sparsity is not None:
            sparsity = check_sparsity("sparsity", sparsity, where="Pruner")
        return make_schedule(schedule, sparsity, **schedule_args)

    def _layer_targets(self, sparsity: Mapping) -> dict[str, float]:
        """``{module or parameter name: sparsity}`` → ``{target name: sparsity}`` for every target."""
        by_name = {}
        for key, value in sparsity.items():
            matches = [t for t in self.targets if key in (t.name, t.module_name)]
            if not matches:
                from prunelab._validation import suggest

                names = [t.module_name or t.name for t in self.targets]
                raise ValueError(
                    f"the 'sparsity' parameter of Pruner has a target for {key!r}, which is "
                    f"not a pruned layer{suggest(str(key), names)}; pruned layers: {', '.join(names)}."
                )
            for t in matches:
                by_name[t.name] = check_sparsity(f"sparsity[{key!r}]", value, where="Pruner")
        missing = [t.module_name or t.name for t in self.targets if t.name not in by_name]
        if missing:
            raise ValueError(
                f"the 'sparsity' parameter of Pruner gives per-layer targets but none for "
                f"{', '.join(missing)}; give every pruned layer a sparsity (0.0 keeps it dense)."
            )
        return by_name

    def _overall(self, layer_targets: dict[str, float]) -> float:
        """The sparsity over all targets that the per-layer targets amount to."""
        sizes = {t.name: t.weight.numel() for t in self.targets}
        return sum(layer_targets[n] * sizes[n] for n in sizes) / sum(sizes.values())

    def _targets_at(self, sparsity: float) -> list[float] | float:
        """Per-layer targets at an event of overall ``sparsity`` (scaled linearly to the
        per-layer final targets), or the scalar when there are no per-layer targets."""
        if self.layer_targets is None:
            return sparsity
        final = self.schedule.final_sparsity
        scale = sparsity / final if final > 0 else 0.0
        return [self.layer_targets[t.name] * scale for t in self.targets]

    def _init_rewind(self, rewind) -> tuple[int | None, dict | None]:
        if rewind is None:
            return None, None
        if isinstance(rewind, Mapping):
            names = [name for name, _ in self.model.named_parameters()]
            if sorted(rewind) != sorted(names):
                raise ValueError(
                    f"the 'rewind' snapshot of Pruner must hold every model parameter "
                    f"({', '.join(names)}); got {', '.join(sorted(rewind))}."
                )
            return 0, {name: rewind[name].detach().clone() for name in names}
        if rewind == "init":
            rewind = 0
        if isinstance(rewind, str) or isinstance(rewind, bool):
            raise ValueError(
                f"the 'rewind' parameter of Pruner must be None, 'init' or a training "
                f"step (int >= 0). Got {rewind!r} instead."
            )
        rewind = check_number("rewind", rewind, where="Pruner", low=0, high=MAX_STEPS, integer=True)
        first = self._events[0][0] if self._events else None
        if first is not None and rewind > first:
            raise ValueError(
                f"the 'rewind' parameter of Pruner must be a step at or before the first "
                f"pruning event (step {first}). Got {rewind} instead."
            )
        return rewind, (self._snapshot_params() if rewind == 0 else None)

    def _snapshot_params(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    # -------------------------------------------------------------- optimiser
    def attach(self, optimizer: torch.optim.Optimizer) -> Pruner:
        """Enforce the masks in ``optimizer``: gradients of pruned entries are zeroed
        before each step, weights re-masked after it, and optimiser state of newly
        pruned entries cleared at each prune. Returns self."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"the 'optimizer' parameter of Pruner.attach must be a "
                f"torch.optim.Optimizer. Got {type(optimizer).__name__} instead."
            )
        if any(h.optimizer is optimizer for h in self._hooks):
            return self
        before = self._observe_then_mask if self.criterion.needs_gradients else self.masks.apply_to_grads
        self._hooks.append(OptimizerHooks(optimizer, before, self.masks.apply_to_weights))
        self.masks.clear_optimizer_state([optimizer])
        return self

    def detach(self) -> None:
        """Remove the optimiser hooks (the weights keep their zeros)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [h.optimizer for h in self._hooks]

    def _observe_then_mask(self, *hook_args) -> None:
        if self._observing_now():
            self.criterion.observe(self.targets)
        self.masks.apply_to_grads()

    def _observing_now(self) -> bool:
        window = getattr(self.criterion, "window", None)
        if window is None or self._next_event >= len(self._events):
            return True
        # this optimiser step will be training step (step_count + 1)
        return self.step_count + 1 > self._events[self._next_event][0] - window

    # ---------------------------------------------------------------- driving
    def step(self) -> list[PruneRecord]:
        """Count one completed training step and prune if an event is due.

        Call after each optimiser step. Events due at step 0 take effect on the
        first call (or call :meth:`update` before training). Returns the records
        of events applied now (usually none)."""
        self.step_count += 1
        if self._rewind_step is not None and self._snapshot is None and self.step_count >= self._rewind_step:
            self._snapshot = self._snapshot_params()
        return self.update()

    def update(self) -> list[PruneRecord]:
        """Apply every event due at the current step count, without advancing it."""
        due = []
        while self._next_event < len(self._events) and self._events[self._next_event][0] <= self.step_count:
            due.append(self._next_event)
            self._next_event += 1
        if not due:
            return []
        index = due[-1]
        record = self._prune(self._events[index][1], Event(index, index == len(self._events) - 1))
        return [record]

    def event_due(self, steps: int = 1) -> bool:
        """Whether the next ``steps`` calls to :meth:`step` apply an event (``steps=0``: whether
        :meth:`update` would apply one now). Lets a driver that keeps the weights elsewhere (the
        batched engine) load them into the model only when the Pruner is about to read them."""
        return self._next_event < len(self._events) and self._events[self._next_event][0] <= self.step_count + steps

    # callback protocol used by prunelab.fit
    def on_train_begin(self, state=None) -> None:
        self.update()

    def on_step_end(self, state=None) -> None:
        self.step()

    def on_epoch_end(self, state=None) -> None:
        pass

    @property
    def done(self) -> bool:
        """True once every scheduled event has been applied."""
        return self._next_event >= len(self._events)

    def prune_to(self, sparsity: float) -> PruneRecord:
        """Prune now to ``sparsity`` (outside the schedule), as a final event."""
        sparsity = check_sparsity("sparsity", sparsity, where="Pruner.prune_to")
        return self._prune(sparsity, Event(len(self.history), final=True))

    # ------------------------------------------------------------ gradients
    def observe_gradients(self) -> None:
        """Record the current ``.grad`` for gradient-based criteria (call after backward)."""
        self.criterion.observe(self.targets)

    def calibrate(
        self,
        data: tuple[torch.Tensor, torch.Tensor] | Batches | None = None,
        loss_fn: Callable | None = None,
        batch_size: int | None = None,
    ) -> int:
        """Let a data-driven criterion (gradient, OBD, L-OBS) accumulate its statistics over
        ``data`` (an ``(x, y)`` pair or an iterable of batches; default: the Pruner's
        ``calibration``). Returns the number of batches (0 for criteria that use no data).
        The Pruner calls this itself before every prune when it has ``calibration``."""
        if not self.criterion.needs_data:
            return 0
        data = self.calibration if data is None else data
        if data is None:
            raise ValueError(
                f"criterion {self.criterion.name!r} needs calibration data: pass "
                f"calibration=(x, y) to the Pruner, or data to calibrate()."
            )
        batches = list(iter_batches(data, batch_size or self.calibration_batch_size, where="Pruner.calibrate"))
        loss = self.loss if loss_fn is None else make_loss(loss_fn, self.loss.output_key, where="Pruner.calibrate")
        if data is not self.calibration:  # the Pruner's own calibration was checked when it was given
            check_batch_fits(
                self.model,
                batches[0],
                "the batches of the 'data' parameter of Pruner.calibrate",
                loss if self.criterion.needs_gradients else None,
            )
        self.criterion.calibrate(self.model, self.targets, batches, loss)
        return len(batches)

    # -------------------------------------------------------------- pruning
    @torch.no_grad()
    def _prune(self, sparsity: float, event: Event) -> PruneRecord:
        for target in self.targets:  # a NaN weight would get an arbitrary rank: refuse, change nothing
            check_finite(
                f"the weight {target.name!r} of the model being pruned",
                target.weight,
                hint="; pruning cannot rank such weights (did training diverge?)",
            )
        if self.criterion.needs_data and self.calibration is not None:
            self.criterion.reset()
            with torch.enable_grad():
                self.calibrate()
        targets = self._targets_at(sparsity)
        if self.criterion.updates_weights:
            per_layer = targets if isinstance(targets, list) else [targets] * len(self.targets)
            keeps = list(self.criterion.solve(self._solve_request(per_layer, event)))
            for i, target in enumerate(self.targets):
                keep, keeps[i] = keeps[i], None  # each freed once stored: not all masks twice at once
                old = self.masks.get(target.weight)
                self.masks.set(target.weight, keep if old is None or keep is old else keep & old.bool())
                del keep
            return self._after_prune(sparsity, tuple(getattr(self.criterion, "last_held", ())))
        skipped = getattr(self.criterion, "skipped", None) or {}
        active = [t for t in self.targets if t.name not in skipped]  # a criterion's skipped layers stay as they are
        if isinstance(targets, list):
            targets = [s for t, s in zip(self.targets, targets) if t.name not in skipped]
        if self.scope.independent:
            per_layer = targets if isinstance(targets, list) else [targets] * len(active)
            chosen, held = self._select_each(active, per_layer, event)
        else:
            chosen, held = self._select_together(active, targets, event)
        for i, (target, group_keep) in enumerate(chosen):
            chosen[i] = None  # each freed once stored
            self._set_masks(target, group_keep)
            del group_keep
        return self._after_prune(sparsity, held)

    def _solve_request(self, sparsities: list[float], event: Event) -> SolveRequest:
        """What a criterion that prunes layers as a whole is given at an event, instead of the Pruner."""
        nm = (self.granularity.n, self.granularity.m) if isinstance(self.granularity, NMGranularity) else None
        return SolveRequest(
            self.model,
            self.targets,
            sparsities,
            event,
            self.scope,
            self.min_keep,
            self.masks,
            nm=nm,
            structured=self.granularity.name == "channel",
            select=self._choose,
            store=self._set_masks,
        )

    def _scored_layer(self, target: Target, score: torch.Tensor) -> tuple[LayerGroups, torch.Size]:
        check_finite(
            f"the {self.criterion.name!r} scores of {target.name!r}",
            score,
            hint="; check the calibration data and the loss",
        )
        return self._layer_groups(target, score)

    def _select_each(self, active: list[Target], sparsities: list[float], event: Event):
        """Scopes that decide each layer alone: score, group and select one layer at a time, so
        that only one layer's scores are in memory. Returns ``[(target, group keep-mask)]``, set
        by the caller once every layer is chosen (a non-finite score anywhere changes nothing),
        and the layers the no-empty-layer guard held."""
        chosen, held = [], []
        stream = score_stream(self.criterion, active)  # next(), not zip(): zip's tuple would hold
        for i, target in enumerate(active):  # the last scores while the next are made
            score = next(stream)
            group_keep, was_held = self._choose(target, score, sparsities[i], event, i, len(active))
            del score  # before the next layer's scores are made
            if was_held:
                held.append(target.name)
            chosen.append((target, group_keep))
        return chosen, tuple(held)

    def _choose(
        self, target: Target, score: torch.Tensor, sparsity: float, event: Event, index: int, n_layers: int
    ) -> tuple[torch.Tensor, bool]:
        """One layer's group keep-mask (shaped like its group scores) under a scope that decides
        each layer alone, and whether the no-empty-layer guard held it. Sets no mask (see
        :meth:`_set_masks`); a criterion that prunes block by block (Wanda's) calls both."""
        layer, shape = self._scored_layer(target, score)
        keep = self.scope.select_layer(layer, sparsity, event, self.min_keep, index, n_layers)
        held = self.scope.held_layer(layer, keep, sparsity, event, self.min_keep, index, n_layers)
        return keep.reshape(shape), held

    def _select_together(self, active: list[Target], targets, event: Event):
        """Scopes that share the target between layers (``global``): every layer's group scores
        (one layer's raw scores at a time), then one selection over all of them."""
        layers, group_shapes = [], []
        stream = score_stream(self.criterion, active)
        for target in active:
            score = next(stream)
            layer, shape = self._scored_layer(target, score)
            del score  # only the group scores are kept (the same tensor for weights)
            layers.append(layer)
            group_shapes.append(shape)
        keeps = self.scope.select(layers, targets, event, self.min_keep)
        held = tuple(active[i].name for i in self.scope.held(layers, targets, event, keeps, self.min_keep))
        del layers
        return [(t, k.reshape(shape)) for t, k, shape in zip(active, keeps, group_shapes)], held

    def _set_masks(self, target: Target, group_keep: torch.Tensor) -> None:
        """Store a layer's new keep-mask (and its units' bias mask), ANDed with the old."""
        weight = target.weight
        new = self.granularity.expand(group_keep, weight, target)
        old = self.masks.get(weight)
        self.masks.set(weight, new if old is None else new & old.bool())
        bias_keep = self.granularity.bias_mask(group_keep.flatten())
        bias, part = _unit_bias(target)
        if bias_keep is not None and bias is not None:
            old_bias = self.masks.get(bias)
            keep_bias = torch.ones_like(bias, dtype=torch.bool) if old_bias is None else old_bias.bool()
            keep_bias[part] &= bias_keep.to(keep_bias.device)
            self.masks.set(bias, keep_bias)

    def _layer_groups(self, target: Target, score: torch.Tensor) -> tuple[LayerGroups, torch.Size]:
        """One layer's group scores and alive groups for the scope, and the groups' shape.
        Groups the granularity protects (N:M: each run's best) score +inf and count as alive, so
        that no scope takes them and every run counts its full quota."""
        weight = target.weight
        mask = self.masks.get(weight)
        alive = mask.bool() if mask is not None else torch.ones_like(weight, dtype=torch.bool)
        alive_groups = self.granularity.group_scores(alive.to(torch.float32), "sum", target) > 0
        group_scores = self.granularity.group_scores(score.float(), self.reduction, target)
        protected = self.granularity.protected(score.float(), alive, target)
        if protected is not None:
            group_scores = group_scores.masked_fill(protected, float("inf"))
            alive_groups = alive_groups | protected
        rows = self.granularity.group_rows(weight, target) if getattr(self.scope, "needs_rows", False) else None
        layer = LayerGroups(
            group_scores.flatten(), alive_groups.flatten(), self.granularity.group_size(weight, target), rows
        )  # rows: a stride-0 view
        return layer, group_scores.shape

    def _after_prune(self, sparsity: float, held: tuple[str, ...] = ()) -> PruneRecord:
        self.masks.apply_to_weights()
        self.masks.clear_optimizer_state(self.optimizers)
        self.criterion.reset()
        if self._snapshot is not None:
            self._rewind()
        report = getattr(self.criterion, "last_report", None)
        record = PruneRecord(self.step_count, sparsity, self.sparsity(), self.layer_sparsity(), report, held)
        self.history.append(record)
        if held:
            warnings.warn(
                SparsityShortfall(
                    f"pruning to sparsity {sparsity:.6g} reached {record.sparsity:.6g}: the no-empty-layer guard "
                    f"keeps min_keep={self.min_keep} group(s) of every layer, and held {', '.join(held)} above "
                    f"what the target asked. Lower the target, prune with a finer granularity, or leave "
                    f"those layers out of 'layers'."
                ),
                stacklevel=2,
            )
        return record

    @torch.no_grad()
    def _rewind(self) -> None:
        assert self._snapshot is not None  # called only once the snapshot is taken
        for name, p in self.model.named_parameters():
            p.copy_(self._snapshot[name])
        self.masks.apply_to_weights()
        for optimizer in self.optimizers:
            optimizer.state.clear()

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned entries in place (the optimiser hooks call this after each step)."""
        self.masks.apply_to_weights()

    # ------------------------------------------------------------ reporting
    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of exact zeros in each prunable tensor."""
        return {t.name: 1.0 - int(torch.count_nonzero(t.weight)) / t.weight.numel() for t in self.targets}

    def sparsity(self) -> float:
        """Fraction of exact zeros over all prunable tensors."""
        total = sum(t.weight.numel() for t in self.targets)
        nonzero = sum(int(torch.count_nonzero(t.weight)) for t in self.targets)
        return 1.0 - nonzero / total

    def mask(self, name: str) -> torch.Tensor:
        """The bool keep-mask of a target (by parameter name)."""
        for t in self.targets:
            if t.name == name:
                m = self.masks.get(t.weight)
                return torch.ones_like(t.weight, dtype=torch.bool) if m is None else m.bool()
        raise ValueError(f"no prunable tensor {name!r}; targets: {', '.join(t.name for t in self.targets)}")

    def state_dict(self) -> dict:
        """Masks and schedule progress, as plain tensors and ints (for checkpoints)."""
        return {
            "step_count": self.step_count,
            "next_event": self._next_event,
            "masks": {t.name: self.mask(t.name) for t in self.targets},
            "bias_masks": {
                t.name: cast(torch.Tensor, self.masks.get(bias)).bool()  # masked: `bias in self.masks`
                for t in self.targets
                for bias in [_unit_bias(t)[0]]
                if bias is not None and bias in self.masks
            },
        }

    def load_state_dict(self, state: dict) -> None:
        names = {t.name: t for t in self.targets}
        unknown = sorted(set(state["masks"]) - set(names))
        if unknown:
            raise ValueError(
                f"Pruner.load_state_dict: masks for unknown tensors {unknown}; targets: {', '.join(names)}"
            )
        for name, keep in state["masks"].items():
            self.masks.set(names[name].weight, keep.bool())
        for name, keep in state.get("bias_masks", {}).items():
            # state_dict() saves bias masks only for targets that have a bias
            self.masks.set(cast(torch.Tensor, _unit_bias(names[name])[0]), keep.bool())
        self.step_count = int(state["step_count"])
        self._next_event = int(state["next_event"])
        self.apply_masks()

    def __repr__(self) -> str:
        return (
            f"Pruner(criterion={self.criterion!r}, granularity={self.granularity.name!r}, "
            f"scope={self.scope.name!r}, schedule={self.schedule!r}, "
            f"targets={[t.name for t in self.targets]})"
        )


def _unit_bias(target: Target) -> tuple[torch.Tensor | None, slice]:
    """The bias whose entries go with the target's units, and the part of it that is theirs: the
    whole ``target.bias``, or for MultiheadAttention's separate ``q/k/v_proj_weight`` its third of
    the shared ``in_proj_bias``."""
    module = target.module
    if (
        target.layout == "attention"
        and target.param_name != "in_proj_weight"
        and getattr(module, "in_proj_bias", None) is not None
    ):
        module = cast(nn.MultiheadAttention, module)  # the attention layout: a MultiheadAttention's weight
        d = module.embed_dim
        third = ("q_proj_weight", "k_proj_weight", "v_proj_weight").index(target.param_name)
        return module.in_proj_bias, slice(third * d, (third + 1) * d)
    return target.bias, slice(None)


def _check_tied_embeddings(model: nn.Module, targets: list[Target], granularity: Granularity) -> None:
    """A weight tied to an embedding (GPT-2's lm_head) is an embedding's table too: single weights only."""
    if granularity.name == "weight":
        return
    embeddings = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for target in targets:
        if target.layout != "embedding" and id(target.weight) in embeddings:
            raise ValueError(
                f"granularity {granularity.name!r} does not apply to {target.name!r}: it is tied to the "
                f"Embedding {embeddings[id(target.weight)]!r}, whose rows are vocabulary entries; a tied "
                f"weight is pruned with granularity='weight' only (or leave it out of 'layers')."
            )


def _is_sliceable(data) -> bool:
    """An ``(x, y)`` pair of tensors or a dict of tensors: sliced into batches at every use."""
    return (isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data)) or (
        isinstance(data, Mapping) and bool(data) and all(torch.is_tensor(v) for v in data.values())
    )


def _non_empty(targets: list[Target], named: bool) -> list[Target]:
    """The targets with at least one weight. A layer with a zero-size weight (``nn.Linear(0, 4)``)
    has nothing to prune: left out of the default targets, refused when named; a model with no
    weight at all to prune is refused."""
    empty = [t for t in targets if t.weight.numel() == 0]
    if empty and named:
        t = empty[0]
        raise ValueError(
            f"the 'layers' parameter of Pruner names {t.module_name or t.name!r}, whose weight has shape "
            f"{tuple(t.weight.shape)} (no entries): there is nothing to prune; leave it out."
        )
    kept = [t for t in targets if t.weight.numel() > 0]
    if targets and not kept:
        raise ValueError(
            f"the 'model' parameter of Pruner has no weight to prune: every prunable layer is empty "
            f"({', '.join(f'{t.name} {tuple(t.weight.shape)}' for t in empty)})."
        )
    return kept


@validate_params(
    {
        **_COMMON,
        "data": [DATA, None],
        "batch_size": [BATCH_SIZE],
        "offload": [Options({"memory", "disk"}), None],
        "progress": [bool, None],
    }
)
def prune(
    model: nn.Module,
    sparsity: float | Mapping[str, float] | None,
    *,
    criterion="magnitude",
    granularity="weight",
    scope=None,
    layers=None,
    reduction="l2",
    min_keep=1,
    data=None,
    loss_fn=None,
    batch_size: int = 256,
    output_key: str | None = None,
    seed: int = 0,
    blocks=None,
    offload: str | None = None,
    progress: bool | None = None,
) -> Pruner:
    """One-shot pruning in one call: prune ``model`` in place to ``sparsity`` (a float, or a
    ``{layer: sparsity}`` dict of per-layer targets).

    Returns the :class:`Pruner` that did it; ``pruner.attach(optimizer)`` keeps the
    zeros through fine-tuning. Data-driven criteria (``gradient``, ``obd``, ``wanda``, ``lobs``,
    ``obs-exact``, ``obs-fast``) use ``data`` (an ``(x, y)`` pair or an iterable of
    batches) as calibration set. With an N:M granularity (``granularity="2:4"``) ``sparsity``
    is None or exactly ``1 − N/M``. ``scope=None`` takes the criterion's own (``row`` for
    Wanda, ``local`` otherwise). ``blocks`` (the stack to calibrate block by block, e.g.
    ``"model.layers"``), ``offload`` (``"disk"``: spill the cached block inputs) and
    ``progress`` are options of the criteria that calibrate block by block, passed on to them.
    """
    criterion = _with_options(criterion, blocks=blocks, offload=offload, progress=progress)
    tolerable = isinstance(criterion, Mapping) and criterion.get("epsilon") is not None
    if sparsity is None and tolerable:
        sparsity = 0.0  # unused: the criterion's tolerable error epsilon decides per layer
    granularity = make_granularity(granularity, where="prune")
    if isinstance(granularity, NMGranularity):
        sparsity = granularity.resolve_sparsity(sparsity, "prune")  # None or exactly 1 − N/M
    elif not isinstance(sparsity, Mapping):
        sparsity = check_sparsity("sparsity", sparsity, where="prune")
    pruner = Pruner(
        model,
        sparsity,
        criterion=criterion,
        granularity=granularity,
        scope=scope,
        schedule="one-shot",
        layers=layers,
        reduction=reduction,
        min_keep=min_keep,
        seed=seed,
        calibration=data,
        loss_fn=loss_fn,
        calibration_batch_size=batch_size,
        output_key=output_key,
    )
    if pruner.criterion.needs_data and data is None:
        raise ValueError(f"criterion {pruner.criterion.name!r} needs calibration data: pass data=(x, y) to prune().")
    pruner.update()
    return pruner


def _with_options(criterion, **options):
    """``criterion`` with the given (non-None) options added to its spec."""
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return criterion
    if isinstance(criterion, str):
        return {"name": criterion, **options}
    if isinstance(criterion, Mapping):
        clash = sorted(set(options) & set(criterion))
        if clash:
            raise ValueError(
                f"prune got {clash[0]!r} both as its own parameter and in the criterion dict; give it once."
            )
        return {**criterion, **options}
    raise TypeError(
        f"the {', '.join(map(repr, options))} parameter(s) of prune go to the criterion; with a "
        f"ready {type(criterion).__name__} pass them to its constructor instead."
    )
