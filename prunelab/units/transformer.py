"""Structured transformer pruning: attention heads, MLP channels and whole blocks, with an optional
least-squares refit and channel counts rounded to a multiple (docs/units.md "Transformers").

    from prunelab import units
    result = units.prune_transformer(model, batches, heads=0.25, mlp=0.25, blocks=1, round_to=8)
    small = result.model                                   # a thinner, shallower copy
    print(result.report(model, example_inputs=batches[0]))  # params, FLOPs, latency at batch 1 / 16

* **Heads and MLP channels** are the unit groups of :mod:`prunelab.units.attention`. Every block's
  attention loses ``heads`` of its heads and every MLP ``mlp`` of its channels, the lowest scored
  first. With grouped-query attention ``gqa="query"`` removes query heads evenly within each
  key/value group, ``gqa="kv"`` whole key/value groups with their query heads.
* **Blocks** (depth) are the items of the model's stack of layers (an ``nn.ModuleList``: HF
  ``model.layers``, ``transformer.h``, ``encoder.layer``, ``nn.TransformerEncoder.layers``), scored
  on the calibration data by how much they change their input, ``1 − cos(h_in, h_out)`` averaged over
  token positions; the lowest go. The model's layer count (``config.num_hidden_layers``,
  ``config.layer_types``, ``num_layers``) and each attention's ``layer_idx`` (the key/value cache
  slot) are renumbered, so the model runs, caches and saves.
* **Refit** (:mod:`prunelab.units.refit`): each layer that reads removed units (``o_proj``,
  ``down_proj``, ...) is refit, in forward order, by ridge-damped least squares from its kept inputs
  (of the unpruned model, ``refit="layerwise"``, the default; of the pruned model, ``"sequential"``)
  to the unpruned layer's outputs, and kept only if it lowers the error on held-out calibration
  batches. For a run of removed blocks, the ``down_proj`` of the kept block
  before it is also given the removed blocks' change of the residual stream as a target, where its
  output adds straight into the stream (pre-norm blocks; checked by perturbing it).
* **Rounding**: ``round_to=m`` rounds every kept count so that the thinned widths (MLP channels,
  heads × head size) are multiples of ``m``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, cast

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab._validation import (
    BATCH_SIZE,
    DATA,
    MAX_UNITS,
    MODEL,
    SEED,
    SPARSITY,
    STR,
    Interval,
    Options,
    Types,
    check_choice,
    check_type,
    validate_params,
)
from prunelab.inputs import Batch, forward_batches, iter_batches, logits_of
from prunelab.units import groups as unit_groups
from prunelab.units import refit as lsq
from prunelab.units.groups import UnitGroup
from prunelab.units.removal import Units, score_units
from prunelab.units.scoring import SCORERS

WHERE = "prune_transformer"
TRANSFORMER_SCORERS = ("energy", *SCORERS)
GQA_MODES = ("query", "kv")
ROUNDING = ("nearest", "down", "up")
REFIT_MODES = ("sequential", "layerwise")
#: The most transformer blocks a stack may have removed (or named) in one call.
MAX_BLOCKS = 100_000
REFIT_DEFAULT = "layerwise"


@dataclass
class StructuredPruning:
    """What :func:`prune_transformer` did. ``model`` is the thinned copy; ``plan`` maps each
    group to its removed units (indices in the unpruned model), ``kept`` to its kept count;
    ``removed_blocks`` are indices into the unpruned stack ``stack``; ``block_scores`` are
    ``1 − cos`` per block; ``refits`` the refit layers with their calibration errors; ``notes``
    what was left as it was and why (a count that could not be rounded, a block not refit)."""

    model: nn.Module
    plan: dict[str, torch.Tensor]
    kept: dict[str, int]
    stack: str | None
    removed_blocks: list[int]
    block_scores: torch.Tensor | None
    refits: list = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)

    def report(self, dense: nn.Module, example_inputs, **kwargs):
        """Parameters, FLOPs and measured latency of ``dense`` and the pruned model
        (:func:`prunelab.units.report.speed_report`)."""
        from prunelab.units.report import speed_report

        return speed_report({"dense": dense, "pruned": self.model}, example_inputs, **kwargs)


# ------------------------------------------------------------------ validation
def _check_blocks(blocks):
    if isinstance(blocks, (list, tuple)):
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, Integral) or not 0 <= b < MAX_BLOCKS:
                raise ValueError(
                    f"the 'blocks' parameter of {WHERE} must be a count (an int ≥ 0) or a list of "
                    f"block indices (ints in [0, {MAX_BLOCKS})). Got {list(blocks)!r} instead."
                )
        return sorted({int(b) for b in blocks})
    return int(blocks)


def _check_refit(refit):
    """``refit`` as a mode (``"sequential"``, ``"layerwise"``) or False."""
    if refit is True:
        return REFIT_DEFAULT
    if refit is False:
        return False
    if isinstance(refit, str):
        return check_choice("refit", refit, REFIT_MODES, where=WHERE)
    raise TypeError(
        f"the 'refit' parameter of {WHERE} must be a bool or one of: {', '.join(REFIT_MODES)}. "
        f"Got {refit!r} of type {type(refit).__name__} instead."
    )


def _check(heads, mlp, blocks, gqa, scorer, damp, round_to, rounding):
    """The declared numbers as floats and ints; a list of blocks checked item by item."""
    return float(heads), float(mlp), _check_blocks(blocks), float(damp), int(round_to)


# ------------------------------------------------------------------ the stack of blocks
def find_stack(model: nn.Module, groups: list[UnitGroup], stack: str | None) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the ``nn.ModuleList`` each of whose items holds
    an attention or MLP group (or the one named ``stack``)."""
    modules = dict(model.named_modules())
    if stack is not None:
        check_type("stack", stack, str, where=WHERE)
        if not isinstance(modules.get(stack), nn.ModuleList):
            lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
            raise ValueError(
                f"the 'stack' parameter of {WHERE} names {stack!r}, which is not an nn.ModuleList of "
                f"the model; its ModuleLists: {', '.join(lists) or 'none'}."
            )
        return stack, modules[stack]
    members = {id(g.module) for g in groups}
    found = [
        (n, m)
        for n, m in modules.items()
        if isinstance(m, nn.ModuleList)
        and len(m)
        and all(any(id(x) in members for x in child.modules()) for child in m)
    ]
    if not found:
        raise ValueError(
            f"{WHERE} found no stack of transformer blocks (an nn.ModuleList whose every item has "
            f"attention heads or an MLP) in this {type(model).__name__}."
        )
    if len(found) > 1:
        raise ValueError(
            f"{WHERE} found several stacks of transformer blocks ({', '.join(n for n, _ in found)}); "
            f"name one with stack=."
        )
    return found[0]


def block_of(stack: nn.ModuleList, module: nn.Module) -> int | None:
    for i, block in enumerate(stack):
        if any(m is module for m in block.modules()):
            return i
    return None


def _hidden(args, kwargs):
    if args and torch.is_tensor(args[0]):
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("src"))


def _main(output):
    return output if torch.is_tensor(output) else output[0]


# ------------------------------------------------------------------ one calibration pass
def calibrate(model: nn.Module, batches: list[Batch], stack: nn.ModuleList, consumers: dict[str, nn.Module]):
    """One forward pass of the unpruned model: ``1 − cos(h_in, h_out)`` of every block (mean over
    token positions) and ``E[x_f²]`` of every input feature of each consumer."""
    n = len(stack)
    change = torch.zeros(n, dtype=torch.float64)
    tokens = torch.zeros(n, dtype=torch.float64)
    squares = {name: [0.0, 0] for name in consumers}
    inputs = {}
    handles = []

    def pre(i):
        def hook(module, args, kwargs):
            inputs[i] = _hidden(args, kwargs)

        return hook

    def post(i):
        def hook(module, args, kwargs, output):
            a, b = lsq.tokens(inputs.pop(i)), lsq.tokens(_main(output))
            change[i] += (1.0 - nn.functional.cosine_similarity(a, b, dim=1)).sum().cpu()
            tokens[i] += len(a)

        return hook

    def square(name):
        def hook(module, args):
            x = lsq.tokens(args[0])
            squares[name][0] = squares[name][0] + x.pow(2).sum(dim=0).cpu()
            squares[name][1] += len(x)

        return hook

    for i, block in enumerate(stack):
        handles.append(block.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post(i), with_kwargs=True))
    handles += [m.register_forward_pre_hook(square(name)) for name, m in consumers.items()]
    try:
        with _fast_paths_off(), eval_mode(model), torch.no_grad():
            for batch in batches:
                batch.call(model)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, (_, count) in squares.items() if not count]
    if missing or not bool((tokens > 0).all()):
        where = missing[0] if missing else f"block {int(torch.nonzero(tokens == 0)[0])} of the stack"
        raise ValueError(f"{WHERE}: the calibration forward never reached {where}.")
    return change / tokens, {name: total / count for name, (total, count) in squares.items()}


def _fast_paths_off():
    from prunelab.metrics.flops import attention_fast_paths_off  # hooks must see every Linear

    return attention_fast_paths_off()


# ------------------------------------------------------------------ how many units stay
def kept_count(
    per_block: int, n_blocks: int, width: int, fraction: float, round_to: int, rounding: str
) -> tuple[int, bool]:
    """Units kept per block (of ``per_block``), so that ``kept · n_blocks · width`` (the thinned
    size) is a multiple of ``round_to``; ``(count, rounded)``. The target ``per_block −
    round(fraction · per_block)`` (at least 1) goes to the nearest allowed count (ties: the larger),
    or the next one below / above; where no count in ``[1, per_block]`` is allowed it stays."""
    target = max(1, per_block - round(fraction * per_block))
    allowed = [c for c in range(1, per_block + 1) if (c * n_blocks * width) % round_to == 0]
    if not allowed:
        return target, False
    below = [c for c in allowed if c <= target]
    above = [c for c in allowed if c >= target]
    if rounding == "down" and below:
        return below[-1], True
    if rounding == "up" and above:
        return above[0], True
    candidates = [c for c in (below[-1] if below else None, above[0] if above else None) if c is not None]
    return min(candidates, key=lambda c: (abs(c - target), -c)), True


def _shape(group: UnitGroup) -> tuple[int, int, int]:
    """(units per block, blocks, width of a unit in thinned features) of a group."""
    n_blocks = 1 if group.blocks is None else len(torch.unique(group.blocks))
    width = group.points[0].index.shape[1]
    if group.kind == "kv_heads":  # a key/value head's size, not its query heads' columns of o_proj
        per_kv = getattr(group.owner, "num_key_value_groups", 1)
        width //= per_kv if isinstance(per_kv, int) and per_kv > 0 else 1
    return group.n_units // n_blocks, n_blocks, width


def energy_scores(group: UnitGroup, second_moment: torch.Tensor) -> torch.Tensor:
    """``Σ_f ‖W[:, f]‖² · E[x_f²]`` over a unit's input features ``f`` of the layer that reads it:
    its mean squared contribution to that layer's output (cross terms left out)."""
    W = lsq.weight_matrix(group.points[0].module).double().cpu()
    per_feature = W.pow(2).sum(dim=0) * second_moment
    return per_feature[group.points[0].index].sum(dim=1)


# ------------------------------------------------------------------ the entry point
@validate_params(
    {
        "model": [MODEL],
        "data": [DATA, None],
        "heads": [SPARSITY],
        "mlp": [SPARSITY],
        "blocks": [Interval(Integral, 0, MAX_BLOCKS), Types(list, tuple)],
        "gqa": [Options(GQA_MODES)],
        "scorer": [Options(TRANSFORMER_SCORERS)],
        "refit": [bool, Options(REFIT_MODES)],
        "damp": [Interval(Real, 0, None)],
        "round_to": [Interval(Integral, 1, MAX_UNITS)],
        "rounding": [Options(ROUNDING)],
        "stack": [STR, None],
        "batch_size": [BATCH_SIZE],
        "seed": [SEED],
        "loss_fn": ["callable", None],
        "output_key": [STR, None],
    },
    where=WHERE,
)
def prune_transformer(
    model: nn.Module,
    data=None,
    *,
    heads: float = 0.0,
    mlp: float = 0.0,
    blocks=0,
    gqa: str = "query",
    scorer: str = "energy",
    refit: bool | str = True,
    damp: float = 0.01,
    round_to: int = 1,
    rounding: str = "nearest",
    stack: str | None = None,
    example_inputs=None,
    batch_size: int = 256,
    seed: int = 0,
    loss_fn=None,
    output_key: str | None = None,
) -> StructuredPruning:
    """Remove ``heads`` of every attention layer's heads, ``mlp`` of every MLP's channels and
    ``blocks`` whole blocks (a count, lowest ``1 − cos`` first, or a list of indices) of a
    transformer; return a :class:`StructuredPruning` whose ``model`` is a thinned copy (``model``
    is not changed). See the module docstring and docs/units.md.

    ``data``: calibration batches as the model takes them (needed for ``refit``, block scoring
    and every scorer but ``norm``/``rand``). ``scorer``: ``"energy"`` (forward only: a unit's mean
    squared contribution to the next layer's output) or a unit scorer of
    :mod:`prunelab.units` (``abs_mrs``, ... with gradients of the model's loss). ``refit``:
    ``True``/``"layerwise"``, ``"sequential"`` or ``False``. ``damp``: ridge damping of the refit,
    relative to the mean diagonal of the Gram.
    """
    heads, mlp, blocks, damp, round_to = _check(heads, mlp, blocks, gqa, scorer, damp, round_to, rounding)
    refit = _check_refit(refit)
    batches = [] if data is None else list(iter_batches(data, batch_size, where=WHERE))
    wants_data = refit or (isinstance(blocks, int) and blocks > 0) or scorer not in ("rand", "norm")
    if wants_data and not batches:
        raise ValueError(
            f"{WHERE} needs calibration data (data=) for the refit, block scoring and the "
            f"{scorer!r} scorer; pass refit=False, blocks as a list and scorer='norm' without it."
        )
    example = example_inputs if example_inputs is not None else batches[0].slice(0, 2).inputs
    units = Units.of(model, example_inputs=example)
    stack_name, layers = find_stack(model, units.groups, stack)
    chosen = _choose(units, layers, heads, mlp, gqa)
    n_layers = len(layers)
    if isinstance(blocks, list) and blocks and blocks[-1] >= n_layers:
        raise ValueError(
            f"the 'blocks' parameter of {WHERE} names block {blocks[-1]}; {stack_name} has "
            f"{n_layers} blocks (0 to {n_layers - 1})."
        )
    if (len(blocks) if isinstance(blocks, list) else blocks) >= n_layers:
        raise ValueError(
            f"the 'blocks' parameter of {WHERE} removes every block of {stack_name} ({n_layers}); "
            f"at least one must stay."
        )
    consumers = {}
    if batches and scorer == "energy":
        consumers = {_name(model, g.points[0].module): g.points[0].module for g in chosen}
    change, moments = calibrate(model, batches, layers, consumers) if batches else (None, {})
    removed = (
        blocks
        if isinstance(blocks, list)
        else sorted(torch.argsort(change, stable=True)[:blocks].tolist())
        if blocks
        else []
    )
    chosen = [g for g in chosen if block_of(layers, g.points[0].module) not in removed]
    plan, kept, notes = _plan(
        model, units, chosen, moments, heads, mlp, scorer, round_to, rounding, batches, seed, loss_fn, output_key
    )
    work, wgroups = _thin(model, units, chosen, plan)
    jobs = _jobs(model, work, units, layers, chosen, wgroups, plan, removed, batches, notes) if refit else []
    remove_blocks(work, stack_name, removed)
    # jobs only when refit is a mode
    refits = [refit_job(model, work, job, layers, batches, damp, cast(str, refit)) for job in jobs]
    return StructuredPruning(work, plan, kept, stack_name, removed, change, refits, notes)


def _name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _choose(units, layers, heads, mlp, gqa) -> list[UnitGroup]:
    """The head groups (query or key/value heads) and MLP groups inside the stack."""
    in_stack = [g for g in units.groups if block_of(layers, g.module) is not None]
    chosen = []
    if heads > 0:
        refused = [k for k in units.refused if k.endswith(":heads")]
        if refused:
            raise ValueError(
                f"{WHERE} cannot remove the heads of {refused[0]}: {units.refused[refused[0]]}. "
                f"Pass heads=0 (its MLP channels and blocks can still go)."
            )
        kinds = {g.owner for g in in_stack if g.kind == "kv_heads"}
        for g in in_stack:
            if g.kind == "heads" and not (gqa == "kv" and g.owner in kinds):
                chosen.append(g)
            elif g.kind == "kv_heads" and gqa == "kv":
                chosen.append(g)
    if mlp > 0:
        chosen += [g for g in in_stack if g.kind == "dense"]
    return chosen


def _plan(model, units, chosen, moments, heads, mlp, scorer, round_to, rounding, batches, seed, loss_fn, output_key):
    """Removed units per group (lowest scores), the kept counts, and notes on unrounded counts."""
    from prunelab.units.scoring import select

    if scorer == "energy":
        scores = {g.name: energy_scores(g, moments[_name(model, g.points[0].module)]) for g in chosen}
    elif chosen:
        scores = score_units(
            model,
            scorer,
            batches or None,
            layers=[g.name for g in chosen],
            units=units,
            seed=seed,
            loss_fn=loss_fn,
            output_key=output_key,
        )
    plan, kept, notes = {}, {}, {}
    for g in chosen:
        per_block, n_blocks, width = _shape(g)
        keep, rounded = kept_count(per_block, n_blocks, width, mlp if g.kind == "dense" else heads, round_to, rounding)
        if not rounded:
            where = "per key/value group " if n_blocks > 1 else ""
            notes[g.name] = (
                f"no kept count of 1 to {per_block} units {where}({width} features each) makes the "
                f"thinned width a multiple of round_to={round_to}; kept {keep} unrounded"
            )
        plan[g.name] = unit_groups.select_group(g, scores[g.name], select, None, per_block - keep)
        kept[g.name] = keep * n_blocks
    return plan, kept, notes


def _thin(model, units, chosen, plan):
    """A thinned copy (masked first, then cut; the two must give the same outputs)."""
    work, wgroups = copy.deepcopy((model, chosen))
    if not chosen:
        return work, wgroups
    for g in wgroups:
        if len(plan[g.name]):
            unit_groups.zero(g, plan[g.name])
    batch = units.example_batch
    masked = logits_of(forward_batches(work, [batch], where=WHERE))
    unit_groups.thin_groups(work, wgroups, plan)
    got = logits_of(forward_batches(work, [batch], where=WHERE))
    difference = float((masked - got).abs().max()) if masked.shape == got.shape else math.inf
    if not difference <= 1e-4 * (1.0 + float(masked.abs().max())):
        raise ValueError(
            f"{WHERE}: thinning {', '.join(plan)} does not keep the masked model's outputs (largest "
            f"difference {difference:.3g}): the model's forward reads a size that unit removal does "
            f"not update."
        )
    return work, wgroups


@dataclass
class _Job:
    """One layer to refit: its name, the unpruned and the thinned module, its input features in the
    unpruned model, and the run ``(i, j)`` of removed blocks whose change it takes on, if any."""

    name: str
    dense: nn.Module
    thinned: nn.Module
    features: int
    order: tuple
    kept: torch.Tensor  # the kept input features, in the unpruned layer
    run: tuple[int, int] | None = None


def _jobs(model, work, units, layers, chosen, wgroups, plan, removed, batches, notes) -> list[_Job]:
    """The layers to refit, in forward order: every layer reading removed units, and the last
    projection of the block before each run of removed blocks (where its output adds straight into
    the block's output)."""
    jobs = {}
    for g, wg in zip(chosen, wgroups):
        if len(plan[g.name]):
            point = g.points[0].module
            name = _name(model, point)
            features = lsq.weight_matrix(point).shape[1]
            jobs[name] = _Job(
                name,
                point,
                wg.points[0].module,
                features,
                (block_of(layers, point), g.kind == "dense"),
                unit_groups.kept(g.points[0].index, plan[g.name], features),
            )
    work_modules = dict(work.named_modules())
    mlps = {block_of(layers, g.points[0].module): g.points[0].module for g in units.groups if g.kind == "dense"}
    for i, j in _runs(removed):
        label = f"block {i}" if i == j else f"blocks {i}-{j}"
        down = mlps.get(i - 1)
        if i == 0 or down is None:
            why = "there is no block before it" if i == 0 else f"block {i - 1} has no MLP"
            notes[label] = f"not refit: {why} whose output projection could take its place"
            continue
        name = _name(model, down)
        if not _adds_to_output(model, layers[i - 1], down, batches[0]):
            notes[label] = (
                f"not refit: the output of {name} does not add straight into the output of block "
                f"{i - 1} (a norm after the residual add?), so no linear refit of it can add the "
                f"removed blocks' change"
            )
            continue
        if name not in jobs:
            features = lsq.weight_matrix(down).shape[1]
            jobs[name] = _Job(name, down, work_modules[name], features, (i - 1, True), torch.arange(features))
        jobs[name].run = (i, j)
    return sorted(jobs.values(), key=lambda job: job.order)


class _Stop(Exception):
    """Ends a forward once what it was run for is captured."""


def _capture(model, batch, hooks) -> None:
    """Run ``batch`` through ``model`` with ``hooks`` (``(module, kind, function)``) until one
    raises :class:`_Stop`."""
    handles = [
        m.register_forward_pre_hook(f, with_kwargs=True)
        if kind == "pre"
        else m.register_forward_hook(f, with_kwargs=True)
        for m, kind, f in hooks
    ]
    try:
        with _fast_paths_off(), eval_mode(model), torch.no_grad():
            batch.call(model)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


def _targets(model, job: _Job, layers, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpruned layer's kept inputs and its output on ``batch`` (plus the removed run's
    change of the stream)."""
    got = {}

    def output(module, args, kwargs, out):
        got["x"], got["y"] = args[0], out
        if job.run is None:
            raise _Stop

    def stream_in(module, args, kwargs):
        got["in"] = _hidden(args, kwargs)

    def stream_out(module, args, kwargs, out):
        got["out"] = _main(out)
        raise _Stop

    hooks: list[tuple[nn.Module, str, Callable[..., Any]]] = [(job.dense, "post", output)]
    if job.run is not None:
        hooks += [(layers[job.run[0]], "pre", stream_in), (layers[job.run[1]], "post", stream_out)]
    _capture(model, batch, hooks)
    x = got["x"].index_select(-1, job.kept.to(got["x"].device))
    return x, (got["y"] if job.run is None else got["y"] + (got["out"] - got["in"]))


def refit_job(model, work, job: _Job, layers, batches, damp, mode: str) -> lsq.Refit:
    """Refit one layer of ``work`` (already thinned, earlier layers already refit) to the unpruned
    layer's outputs (:mod:`prunelab.units.refit`), from the inputs it now receives in ``work``
    (``mode="sequential"``) or the unpruned layer's inputs (``"layerwise"``)."""
    bias = getattr(job.thinned, "bias", None) is not None
    fit, held_out = lsq.Normal(bias), lsq.Normal(bias)
    for index, batch in enumerate(batches):
        x, y = _targets(model, job, layers, batch)
        if mode == "sequential":
            got = {}

            def inputs(module, args, kwargs):
                got["x"] = args[0]  # noqa: B023 (used before the loop moves on)
                raise _Stop

            _capture(work, batch, [(job.thinned, "pre", inputs)])
            x = got["x"]
        (held_out if _held_out(index, len(batches)) else fit).add(x, y)
    return lsq.refit_layer(job.name, job.thinned, fit, damp, job.features, held_out)


def _held_out(index: int, n: int) -> bool:
    """Every 4th calibration batch (the last one when there are 2 or 3) checks the refit."""
    return index % 4 == 3 or (n in (2, 3) and index == n - 1)


# ------------------------------------------------------------------ removed blocks
def _runs(removed: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in removed:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _adds_to_output(model, block, down, batch) -> bool:
    """Whether adding δ to ``down``'s output adds exactly δ to ``block``'s output."""
    outputs = []
    delta = {}

    def shift(module, args, output):
        delta["d"] = torch.linspace(-1.0, 1.0, output.numel(), dtype=output.dtype, device=output.device).view_as(output)
        return output + delta["d"]

    keep = block.register_forward_hook(lambda m, a, o: outputs.append(_main(o).detach().clone()))
    try:
        with _fast_paths_off(), eval_mode(model), torch.no_grad():
            batch.call(model)
            handle = down.register_forward_hook(shift)
            try:
                batch.call(model)
            finally:
                handle.remove()
    finally:
        keep.remove()
    if len(outputs) != 2 or outputs[0].shape != delta["d"].shape:
        return False
    change, delta = (outputs[1] - outputs[0]).double(), delta["d"].double()
    scale = 1.0 + float(outputs[0].abs().max())
    return float((change - delta).abs().max()) <= 64 * torch.finfo(outputs[0].dtype).eps * scale


@validate_params({"model": [MODEL], "stack": [STR], "removed": [Types(list, tuple)]})
def remove_blocks(model: nn.Module, stack: str, removed: list[int]) -> None:
    """Drop the ``removed`` items of the ``nn.ModuleList`` ``stack``, in place, and keep the model's
    own layer counts consistent: ``config.num_hidden_layers`` and ``config.layer_types`` (Hugging
    Face), a ``num_layers`` of the list's owner, and every ``layer_idx`` (the key/value cache slot)."""
    if not removed:
        return
    parent_name, _, attr = stack.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    n = len(old)
    keep = [i for i in range(n) if i not in set(removed)]
    for new_index, i in enumerate(keep):
        for module in old[i].modules():
            if isinstance(getattr(module, "layer_idx", None), int) and module.layer_idx == i:
                module.layer_idx = new_index
    setattr(parent, attr, nn.ModuleList([old[i] for i in keep]))
    if getattr(parent, "num_layers", None) == n:
        # torch types Module.__setattr__ for tensors and modules only; plain attributes are allowed
        parent.num_layers = len(keep)  # type: ignore[assignment]
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None) == n:
        config.num_hidden_layers = len(keep)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            config.layer_types = [types[i] for i in keep]
