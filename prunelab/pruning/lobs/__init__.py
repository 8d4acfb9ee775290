"""Layer-wise Optimal Brain Surgeon: ``lobs``, ``obs-exact``, ``obs-fast`` as Pruner criteria.

Each is a *solver* criterion: at a pruning event it collects the layer-wise Hessians
``H = X̃ᵀX̃/n`` of the calibration data (:mod:`hessian`), removes weights and compensates
the remaining ones in each Linear/Conv2d layer (:mod:`lobs`, :mod:`obs_exact`,
:mod:`obs_fast`, and :mod:`structured` for ``granularity="channel"``), and leaves the
masks to the Pruner, so schedules, fine-tuning and the harness work as with any
criterion::

    prunelab.prune(model, 0.93, criterion="obs-fast", data=(x_cal, y_cal))
    Pruner(model, {"fc1": 0.933, "fc2": 0.8, "fc3": 0.35}, criterion={"name": "lobs",
           "mode": "sequential"}, calibration=(x_cal, y_cal))

With ``epsilon`` (a float, or ``{layer: ε}``) ``lobs`` and ``obs-exact`` ignore the sparsity
target and prune, per layer, every weight whose cost stays within the paper's tolerable
error (``√L_q ≤ ε``; for the greedy, ``√(ΔE/2) ≤ ε`` at its step): ``prune(model, None,
criterion={"name": "lobs", "epsilon": 0.05}, data=...)``.

Options: ``mode`` — ``"sequential"`` (each layer's Hessian from the outputs of the layers
before it, already pruned; the default) or ``"parallel"`` (all from the original model);
``damping`` λ (``H + λ·mean(diag H)·I``, default 1e-2); ``update_bias`` (the bias takes
part in the compensation, never pruned; default True); ``low_memory`` (parallel mode: one
layer's Hessian in memory at a time, at one calibration pass per layer); ``block_size``
(obs-fast). After each prune ``pruner.history[-1].report`` (and ``criterion.last_report``)
holds a :class:`LayerReport` per layer, with its seconds and peak memory, and per-block totals.

Block by block (sequential mode): ``blocks`` names the stack of blocks (``"model.layers"``, any
``nn.ModuleList``/``nn.Sequential`` path; default: found by the trace), ``offload="disk"`` keeps
the cached block inputs in a temporary directory (removed afterwards), ``progress`` shows a bar
over the blocks (default: on a terminal), ``compute_dtype="float32"`` runs the block being served
in float32 (a bfloat16/float16 model on a CPU without fast half-precision arithmetic)::

    prunelab.prune(model, 0.5, criterion="obs-fast", data=batches, blocks="model.layers", offload="disk")

Scopes: ``local`` prunes every layer to the target; ``layerwise-constant`` too, raising one
layer per schedule event, round-robin, and every layer at the last; ``global`` (weight
granularity) ranks every weight of every layer by its L-OBS sensitivity ``w_q²/(2[H⁻¹]_qq)``
on the weights before the prune and cuts at one threshold, as the paper's single tolerable
error ε does, then lets each solver reach the layer sparsities that threshold gives (in
sequential mode the later layers are re-solved on the outputs of the pruned earlier ones).
The scope decides all of this (:meth:`prunelab.pruning.scopes.Scope.allocate`); the driver is given
a :class:`~prunelab.pruning.problems.SolveRequest`, not the Pruner, and solves each layer as a
:class:`~prunelab.pruning.problems.LayerProblem` (:meth:`LayerwiseOBS.solve_layer`).

Like every scope, the solvers never empty a layer: at most ``numel − min_keep`` weights (or
``n_inputs − min_keep`` channels) of a layer go, whatever the target or ε asks; the layers so
held are listed in ``criterion.last_held`` (and the Pruner's record). Weights of *dead*
inputs (zero on every calibration sample) are removed first at no cost; those the target does
not remove keep their values.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import cast

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab._memory import PeakMemory
from prunelab._validation import MAX_BATCH, Interval, Options, Types, check_number, validate_params
from prunelab.pruning import blocks as blk
from prunelab.pruning.blocks import COMPUTE_DTYPES, OFFLOADS  # noqa: F401 (public here too)
from prunelab.pruning.criteria import CRITERIA, Criterion
from prunelab.pruning.granularity import NMGranularity, nm_column_order
from prunelab.pruning.lobs import hessian, lobs, obs_exact, obs_fast, structured
from prunelab.pruning.lobs.common import Solution, inverse
from prunelab.pruning.lobs.hessian import LayerHessian, LayerSkipped, check_target, weight_matrix  # noqa: F401 (LayerSkipped: public here)
from prunelab.pruning.lobs.sequential import SequentialHessians
from prunelab.pruning.problems import LayerProblem, LayerSolution, PruneSetting, SolveRequest
from prunelab.pruning.scopes import Allocation, LayerGroups

MODES = ("sequential", "parallel")


@dataclass(frozen=True)
class LayerReport:
    """One layer of an L-OBS prune. Errors are root-mean-square over the n calibration
    columns: ``√E`` with ``E = (1/n)‖Ẑ − Z‖²_F`` (Z from the weights before this prune,
    on this prune's calibration inputs); ``measured`` uses the undamped Hessian, which makes
    it exactly ``‖(Ŵ − W) X̃‖/√n``."""

    layer: str
    shape: tuple
    sparsity: float  # realised, of the weight
    predicted_error: float  # √(predicted E) from the solver's sensitivities
    measured_error: float  # ‖Ẑ − Z‖/√n
    relative_error: float  # ‖Ẑ − Z‖ / ‖Z‖
    n: int  # calibration columns (samples × positions)
    hessian_seconds: float
    solve_seconds: float
    block: str | None = None  # sequential mode: the block the layer is in (None: outside any block)
    seconds: float = 0.0  # wall time of the layer: its inputs' forwards, Hessian and solve
    peak_memory: int | None = None  # bytes: the process's resident high-water mark meanwhile
    live_bytes: int = 0  # bytes of cached block inputs in memory and Hessians held meanwhile

    def as_dict(self) -> dict:
        return asdict(self)


class Report(list):
    """The per-layer reports of one prune, printable as a table (with a total line per block);
    ``skipped`` maps the layers left dense (a kind the solver cannot prune) to the reason.
    ``trace_seconds`` is sequential mode's tracing pass, ``peak_memory`` the resident high-water
    mark of the whole prune (bytes; None where the platform does not say, see
    :mod:`prunelab._memory`)."""

    skipped: dict = {}
    trace_seconds: float = 0.0
    peak_memory: int | None = None

    def _head(self) -> str:
        return (
            f"{'layer':<14} {'sparsity':>8} {'predicted':>10} {'measured':>10} {'relative':>9} "
            f"{'n':>8} {'hessian s':>9} {'solve s':>8} {'total s':>8} {'peak MiB':>9}"
        )

    def _row(self, r) -> str:
        return (
            f"{r.layer:<14} {r.sparsity:8.4f} {r.predicted_error:10.4g} {r.measured_error:10.4g} "
            f"{r.relative_error:9.4f} {r.n:8d} {r.hessian_seconds:9.3f} {r.solve_seconds:8.3f} "
            f"{r.seconds:8.3f} {blk.mib(r.peak_memory):>9}"
        )

    def __str__(self) -> str:
        """One line per layer (:meth:`_head`, :meth:`_row`), a total line after each block and the
        whole prune's peak; subclasses with other per-layer fields give their own two methods."""
        head = self._head()
        lines = [head, "-" * len(head)]
        totals = {b["block"]: b for b in self.blocks()}
        for i, r in enumerate(self):
            lines.append(self._row(r))
            last = i + 1 == len(self) or self[i + 1].block != r.block
            if r.block is not None and last:
                b = totals[r.block]
                lines.append(
                    f"  block {r.block}: {b['layers']} layer(s), {b['seconds']:.3f} s, "
                    f"peak {blk.mib(b['peak_memory'])} MiB"
                )
        if self.peak_memory is not None:
            lines.append(f"whole prune: peak {blk.mib(self.peak_memory)} MiB, trace {self.trace_seconds:.3f} s")
        return "\n".join(lines)

    def totals(self) -> dict:
        return {
            "hessian_seconds": sum(r.hessian_seconds for r in self),
            "solve_seconds": sum(r.solve_seconds for r in self),
            "seconds": sum(r.seconds for r in self) + self.trace_seconds,
        }

    def blocks(self) -> list[dict]:
        """Per-block totals, in pruning order: ``block``, ``layers``, ``seconds`` (summed),
        ``peak_memory`` and ``live_bytes`` (the highest of its layers')."""
        found: dict = {}
        for r in self:
            if r.block is None:
                continue
            b = found.setdefault(
                r.block, {"block": r.block, "layers": 0, "seconds": 0.0, "peak_memory": None, "live_bytes": 0}
            )
            b["layers"] += 1
            b["seconds"] += r.seconds
            if r.peak_memory is not None:
                b["peak_memory"] = max(b["peak_memory"] or 0, r.peak_memory)
            b["live_bytes"] = max(b["live_bytes"], r.live_bytes)
        return list(found.values())


class LayerwiseOBS(Criterion):
    """Shared driver of the three solvers; subclasses set ``name`` and ``_solve``."""

    needs_data = True
    updates_weights = True

    @validate_params(
        {
            "mode": [Options(MODES)],
            "damping": [Interval(Real, 0, None)],
            "update_bias": [bool],
            "low_memory": [bool],
            "block_size": [Interval(Integral, 1, MAX_BATCH)],
            "epsilon": [Interval(Real, 0, None, closed="neither"), Types(dict), None],
            "blocks": [
                Types(str, torch.nn.Module, name="a dotted module path such as 'model.layers' or an nn.ModuleList"),
                None,
            ],
            "offload": [Options(OFFLOADS), None],
            "progress": [bool, None],
        },
        where=lambda self: f"{self.name} criterion",
    )
    def __init__(
        self,
        mode: str = "sequential",
        damping: float = 1e-2,
        update_bias: bool = True,
        low_memory: bool = False,
        block_size: int = 128,
        epsilon=None,
        blocks=None,
        offload: str | None = None,
        progress: bool | None = None,
        compute_dtype=None,
    ):
        where = f"{self.name} criterion"
        self.epsilon = _check_epsilon(epsilon, where)
        self.mode = mode
        self.damping = float(damping)
        self.update_bias, self.low_memory = update_bias, low_memory
        self.block_size = int(block_size)
        self.blocks, self.offload, self.progress = blk.check_block_options(blocks, offload, progress, self.mode, where)
        self.compute_dtype = blk.check_compute_dtype(compute_dtype, self.mode, where)
        self._stack: nn.Module | None = None
        self._batches: list | None = None
        self._original: nn.Module | None = None
        self._hessians: dict[str, LayerHessian] = {}
        self.skipped: dict[str, str] = {}  # default targets left dense: {name: reason}
        self.last_report: Report | None = None
        self.last_held: tuple[str, ...] = ()
        self.last_forwards: dict = {}  # sequential mode: batches run per kind of forward
        self._sequential: SequentialHessians | None = None

    # ------------------------------------------------------------ data
    def _supported(self, model, targets) -> list:
        """The targets this solver prunes; raises for an unsupported one unless skipped."""
        parents = hessian.attention_parents(model)
        for target in targets:
            if target.name not in self.skipped:
                check_target(target, self.name, parents)
        return [t for t in targets if t.name not in self.skipped]

    def calibrate(self, model, targets, batches, loss_fn) -> None:
        targets = self._supported(model, targets)
        self._batches, _ = self._calibration(batches, loss_fn)
        if self.mode == "parallel":
            if self.low_memory:
                self._original = copy.deepcopy(model)  # Hessians later, one layer at a time
            else:
                self._hessians = hessian.collect(model, targets, self._batches, with_bias=self.update_bias)

    def reset(self) -> None:
        self._batches, self._original, self._hessians = None, None, {}

    def validate(self, setting: PruneSetting) -> None:
        if self.blocks is not None:
            self._stack = blk.resolve_stack(setting.model, self.blocks, where=f"{self.name} criterion")
        channel = _channel_unsupported if setting.granularity.name == "channel" else None
        self.skipped = hessian.skip_unsupported(setting, self.name, extra=channel)
        nm = isinstance(setting.granularity, NMGranularity)
        if setting.granularity.name not in ("weight", "channel") and not nm:
            raise ValueError(
                f"{self.name} prunes at granularity 'weight' (unstructured), 'channel' "
                f"(whole inputs, block OBS) or an N:M pattern such as '2:4'; got "
                f"{setting.granularity.name!r}."
            )
        if nm and self.epsilon is not None:
            raise ValueError(
                f"{self.name} with granularity {setting.granularity.name!r}: the pattern decides "
                f"every layer's sparsity; leave out the tolerable error 'epsilon'."
            )
        if nm and not setting.schedule.one_shot:
            raise ValueError(
                f"{self.name} chooses an N:M mask ({setting.granularity.name!r}) in one solve, at the "
                f"pattern's full sparsity; use schedule 'one-shot' (got {setting.schedule.name!r}), "
                f"or a score-based criterion (magnitude, wanda, ...) to reach the pattern gradually."
            )
        if not setting.scope.supports_solvers:
            raise ValueError(
                f"scope {setting.scope.name!r} compares scores within each output row; {self.name} solves each layer "
                f"as a whole: use scope 'local', 'global' or 'layerwise-constant'."
            )
        if setting.granularity.name == "channel" and self.name != "obs-exact":
            raise ValueError(
                f"the structured (channel) variant is the greedy block OBS: use criterion "
                f"'obs-exact' with granularity 'channel' (got {self.name!r})."
            )
        if self.epsilon is not None and self.name == "obs-fast":
            raise ValueError(
                "obs-fast takes sparsity targets only (its masks come from fractions); use "
                "'lobs' or 'obs-exact' with the tolerable error epsilon."
            )
        if isinstance(self.epsilon, dict):
            names = {t.name for t in setting.targets} | {t.module_name for t in setting.targets}
            unknown = sorted(set(self.epsilon) - names)
            if unknown:
                raise ValueError(
                    f"the 'epsilon' parameter of {self.name} names {unknown[0]!r}, not a pruned "
                    f"layer; pruned layers: {', '.join(t.module_name for t in setting.targets)}."
                )
        if not setting.scope.independent:  # the scope ranks the solver's per-weight saliencies
            if setting.granularity.name != "weight":
                raise ValueError(
                    f"scope {setting.scope.name!r} for {self.name} shares the target by ranking single weights: "
                    f"use granularity 'weight', or scope 'local' with granularity "
                    f"{setting.granularity.name!r}."
                )
            if self.epsilon is not None:
                raise ValueError(
                    f"the tolerable error 'epsilon' of {self.name} already decides every layer's "
                    f"sparsity (one ε for all layers is the paper's rule); leave out scope "
                    f"{setting.scope.name!r}, or give a sparsity target instead of epsilon."
                )

    def scores(self, targets):
        raise ValueError(f"{self.name} is a solver: it prunes through Pruner/prune(), not by scores.")

    def _hessian(self, request, target) -> LayerHessian:
        if self._batches is None:
            raise ValueError(
                f"criterion {self.name!r} needs calibration data: pass calibration=(x, y) "
                f"to the Pruner, or data= to prune()."
            )
        if self.mode == "sequential":
            assert self._sequential is not None  # built by solve() before any layer is solved
            return self._sequential.get(target)
        if self.low_memory:
            assert self._original is not None  # copied by calibrate() in low-memory parallel mode
            twin = dict(self._original.named_modules())[target.module_name]
            copy_target = type(target)(target.name, target.module_name, twin, target.param_name)
            return hessian.collect(self._original, [copy_target], self._batches, with_bias=self.update_bias)[
                target.name
            ]
        return self._hessians[target.name]

    # ----------------------------------------------------------- solve
    @torch.no_grad()
    def solve(self, request: SolveRequest) -> list[torch.Tensor]:
        """Prune the layers the scope raises at this event (a :class:`SolveRequest`, not the Pruner):
        one :class:`LayerProblem` per layer, in model order, each solved by :meth:`solve_layer` on its
        Hessian (in sequential mode from the outputs of the layers already pruned). Returns the
        keep-masks, one per ``request.targets``."""
        if self._batches is None:
            raise ValueError(
                f"criterion {self.name!r} needs calibration data: pass calibration=(x, y) "
                f"to the Pruner, or data= to prune()."
            )
        keeps, report, held = [], Report(), []
        report.skipped = dict(self.skipped)
        memory: dict = {}  # the whole prune's peak, across the per-layer resets
        targets, scope = request.targets, request.scope
        if scope.independent:  # each layer's target from the scope alone (e.g. round-robin)
            allocation = scope.allocate(len(targets), request.sparsities, request.event, request.min_keep)
        else:  # shared between layers: the scope ranks the solver's saliencies
            with PeakMemory(memory):
                allocation = self._shared_allocation(request, request.sparsities[0])
        sparsities = allocation.sparsities
        held = [targets[i].name for i in allocation.held]
        raised = {i for i, r in enumerate(allocation.raised) if r}
        todo = [t for i, t in enumerate(targets) if t.name not in self.skipped and i in raised]
        spill = blk.Spill() if self.offload == "disk" and self.mode == "sequential" else None
        bar = None
        try:
            with eval_mode(request.model):
                if self.mode == "sequential":
                    started = time.perf_counter()
                    with PeakMemory(memory):
                        self._sequential = SequentialHessians(
                            request.model,
                            todo,
                            self._batches,
                            with_bias=self.update_bias,
                            stack=self._stack_of(request.model),
                            spill=spill,
                            compute=self.compute_dtype,
                        )
                    report.trace_seconds = time.perf_counter() - started
                bar = self._progress_bar(todo)
                for i, (target, sparsity) in enumerate(zip(targets, sparsities)):
                    if i not in raised or target.name in self.skipped:
                        keeps.append(request.keep(target))
                        continue
                    solution = self._measured_solve(request, target, sparsity, memory)
                    if solution.held:
                        held.append(target.name)
                    keeps.append(solution.keep)
                    report.append(solution.report)
                    if self.mode == "sequential":
                        assert self._sequential is not None
                        self._sequential.pruned(target)
                    bar.step(target)
        finally:
            if bar is not None:
                bar.close()
            sequential = getattr(self, "_sequential", None)
            if sequential is not None:
                sequential.restore()
                self.last_forwards = sequential.forwards
            self._sequential = None
            if spill is not None:
                spill.close()
        report.peak_memory = memory.get("overall")
        self.last_report = report
        self.last_held = tuple(held)
        return keeps

    def _measured_solve(self, request, target, sparsity, memory) -> LayerSolution:
        """:meth:`solve_layer` with the layer's wall time (Hessian included), peak resident
        memory and the bytes of cached inputs and statistics held, added to its report."""
        started = time.perf_counter()
        with PeakMemory(memory) as peak:
            h = self._hessian(request, target)
            live = h.xtx.numel() * h.xtx.element_size()
            if self.mode == "sequential":
                assert self._sequential is not None
                live += self._sequential.cached_bytes() + self._sequential.ready_bytes()
            solution = self.solve_layer(request.problem(target, sparsity, weight_matrix(target)), h)
            del h
        block = None
        if self.mode == "sequential":
            assert self._sequential is not None
            block = self._sequential.block_name[target.name]
        solution.report = dataclasses.replace(
            cast(LayerReport, solution.report),
            block=block,
            seconds=time.perf_counter() - started,
            peak_memory=peak.peak,
            live_bytes=live,
        )
        return solution

    def _stack_of(self, model):
        if self.blocks is not None and self._stack is None:
            self._stack = blk.resolve_stack(model, self.blocks, where=f"{self.name} criterion")
        return self._stack

    def _progress_bar(self, todo) -> blk.BlockBar:
        names: dict[str, str | None] = {}
        if self.mode == "sequential":
            assert self._sequential is not None  # built by solve() before the bar
            names = self._sequential.block_name
        shown = sys.stderr.isatty() if self.progress is None else self.progress
        return blk.BlockBar(todo, names, shown, self.name)

    def solve_layer(self, problem: LayerProblem, h: LayerHessian) -> LayerSolution:
        """Prune one layer (each row block with its own Hessian ``h``); write the new weights and
        bias back. Returns the keep-mask in the weight's shape, the report and the held flag."""
        started = time.perf_counter()
        target, sparsity, structured_mode, nm = problem.target, problem.sparsity, problem.structured, problem.nm
        W = weight_matrix(target).double()
        bias_param = target.bias if h.with_bias else None
        bias = bias_param.detach().double() if bias_param is not None else None
        alive_all = problem.alive
        G = h.groups
        order = nm_column_order(target) if nm is not None else None  # N:M runs as consecutive columns
        if structured_mode and G > 1:
            raise ValueError(
                f"{self.name} with granularity 'channel' needs one input Hessian for all rows; "
                f"{target.name!r} has {G} row blocks with their own inputs."
            )
        rows = W.shape[0] // G
        total = round(sparsity * W.numel())
        wanted_parts = [total // G + (1 if g < total % G else 0) for g in range(G)]
        new_W, keep = torch.empty_like(W), torch.empty_like(W, dtype=torch.bool)
        new_bias = bias.clone() if bias is not None else None
        predicted = measured = signal = 0.0
        held = False
        for g in range(G):
            r = slice(g * rows, (g + 1) * rows)
            hg = h.part(g)
            Wg, bg = W[r], (bias[r] if bias is not None else None)
            W_full = weight_matrix_with_bias(Wg, bg)
            H, W_full, dead = hessian.prepare(hg, W_full, self.damping)
            d_in = Wg.shape[1]
            prunable = torch.zeros(W_full.shape[1], dtype=torch.bool)
            prunable[:d_in] = True
            alive = torch.ones_like(W_full, dtype=torch.bool)
            alive[:, :d_in] = alive_all[r]
            if structured_mode:
                solution = self._structured(target, W_full, H, sparsity, alive, d_in, problem.min_keep)
            elif nm is not None:
                solution = _in_order(
                    cast(torch.Tensor, order),  # made for N:M above
                    W_full,
                    H,
                    alive,
                    lambda W_, H_, alive_: self._solve(W_, H_, 0, prunable, alive_, None, None, nm=nm),  # noqa: B023 (called at once)
                )
            else:
                limit = Wg.numel() - min(problem.min_keep, int(alive[:, :d_in].sum()))  # never empty the layer
                wanted = wanted_parts[g]
                solution = self._solve(W_full, H, min(wanted, limit), prunable, alive, self._epsilon_for(target), limit)
                solution.held = solution.held or (self._epsilon_for(target) is None and wanted > limit)
            held = held or solution.held
            # prepare() zeroed the weights of dead inputs so that they go first, at no cost; those
            # the solver kept get their values back (they cannot change the calibration outputs)
            revived = dead[None, :d_in] & solution.keep[:, :d_in]
            new_W[r] = torch.where(revived, Wg, solution.W[:, :d_in])
            keep[r] = solution.keep[:, :d_in]
            reference = weight_matrix_with_bias(Wg, bg)
            layer_measured, layer_signal = _errors(solution.W - reference, reference, hg.H)
            measured += layer_measured if hg.n else 0.0
            signal += layer_signal
            predicted += solution.predicted
            if new_bias is not None:
                new_bias[r] = solution.W[:, d_in]
        self._write(target, new_W * keep, keep)
        if bias_param is not None:
            assert new_bias is not None  # a copy of the bias
            bias_param.copy_(new_bias.to(bias_param.dtype))
        keep = keep.t() if target.layout == "transposed" else keep.reshape(target.weight.shape)
        report = LayerReport(
            layer=target.name,
            shape=tuple(target.weight.shape),
            sparsity=1.0 - float(keep.float().mean()),
            predicted_error=math.sqrt(max(predicted, 0.0)),
            measured_error=math.sqrt(max(measured, 0.0)),
            relative_error=math.sqrt(max(measured, 0.0) / signal) if signal > 0 else 0.0,
            n=h.n,
            hessian_seconds=h.seconds,
            solve_seconds=time.perf_counter() - started,
        )
        return LayerSolution(keep, report, held)

    @staticmethod
    def _write(target, W, keep) -> None:
        value = W.t() if target.layout == "transposed" else W.reshape(target.weight.shape)
        target.weight.copy_(value.to(target.weight.dtype))

    def _shared_allocation(self, request, sparsity: float) -> Allocation:
        """A scope that shares the target between layers (``global``) ranks the sensitivities
        ``L_q = w_q²/(2[H⁻¹]_qq)`` of every weight of every layer at one threshold (the paper's
        single tolerable error ε, set by the target instead of given), computed on the weights
        before this prune with the Hessians of the model as it is now. Returns the scope's
        allocation over all targets, each layer's sparsity for the solver to reach in its own
        order. Skipped layers stay dense and out of the count."""
        supported = [t for t in request.targets if t.name not in self.skipped]
        layers = [LayerGroups(L.flatten(), alive.flatten(), 1) for L, alive in self._saliencies(request, supported)]
        allocation = request.scope.allocate(layers, sparsity, request.event, request.min_keep)
        chosen = {t.name: s for t, s in zip(supported, allocation.sparsities)}
        position = {t.name: i for i, t in enumerate(request.targets)}
        return Allocation(
            [chosen.get(t.name, 0.0) for t in request.targets],
            [t.name in chosen for t in request.targets],
            tuple(position[supported[i].name] for i in allocation.held),
        )

    def _saliencies(self, request, supported):
        """Each target's L-OBS sensitivities ``w_q²/(2[H⁻¹]_qq)`` (as ``target.matrix()``) and alive
        weights, one target at a time."""
        together = None
        if self.mode == "sequential" or not self.low_memory:
            together = (
                hessian.collect(request.model, supported, self._batches, with_bias=self.update_bias)
                if self.mode == "sequential"
                else self._hessians
            )
        for target in supported:
            h = together[target.name] if together is not None else self._hessian(request, target)
            W = weight_matrix(target).double()
            bias = target.bias if h.with_bias else None
            bias = bias.detach().double() if bias is not None else None
            rows = W.shape[0] // h.groups
            parts = []
            for g in range(h.groups):
                r = slice(g * rows, (g + 1) * rows)
                H, W_full, _ = hessian.prepare(
                    h.part(g), weight_matrix_with_bias(W[r], bias[r] if bias is not None else None), self.damping
                )
                parts.append(W_full[:, : W.shape[1]].pow(2) / (2 * torch.diagonal(inverse(H))[: W.shape[1]]))
            yield torch.cat(parts), request.alive(target, W)

    def _structured(self, target, W_full, H, sparsity, alive, d_in, min_keep):
        module = target.module
        group = math.prod(module.kernel_size) if target.layout == "conv" else 1
        n_inputs = d_in // group
        alive_groups = alive[:, :d_in].reshape(-1, n_inputs, group).all(dim=2).all(dim=0)
        limit = n_inputs - min(min_keep, int(alive_groups.sum()))  # never empty the layer
        wanted = round(sparsity * n_inputs)
        solution = structured.solve(W_full, H, min(wanted, limit), group, n_inputs, alive_groups)
        solution.held = wanted > limit
        return solution

    def _epsilon_for(self, target) -> float | None:
        if isinstance(self.epsilon, dict):
            return self.epsilon.get(target.name, self.epsilon.get(target.module_name))
        return self.epsilon

    def _solve(self, W, H, n_prune, prunable, alive, epsilon, limit, nm=None):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, damping={self.damping:g})"


def _channel_unsupported(target) -> str | None:
    """Why the structured (channel) solver, which removes input columns shared by all rows,
    does not apply."""
    module = target.module
    if target.layout == "conv" and module.groups != 1:
        return f"granularity 'channel' needs groups=1 convolutions; it has groups={module.groups}"
    if target.layout in ("attention", "recurrent"):
        return f"granularity 'channel' covers Linear, Conv and HF Conv1D weights, not a {target.kind}'s"
    return None


def _errors(delta: torch.Tensor, reference: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """The report's ``Σ_r δ_r H δ_rᵀ`` (the solution's layer-wise error) and ``Σ_r w_r H w_rᵀ``
    (the signal it is relative to). Layers wider than obs-fast's float64 limit use one float32
    product for both (as their solve does), summed in float64: in float64 the two products of a
    1024×4096 layer cost seconds, more than its solve."""
    if H.shape[0] > obs_fast.FLOAT64_UP_TO:
        A = torch.cat([delta.float(), reference.float()])
        per_row = ((A @ H.float()) * A).sum(dim=1).double()  # rows summed in float64
        return float(per_row[: len(delta)].sum()), float(per_row[len(delta) :].sum())
    return (
        float(torch.einsum("ri,ij,rj->", delta, H, delta)),
        float(torch.einsum("ri,ij,rj->", reference, H, reference)),
    )


def _in_order(order: torch.Tensor, W: torch.Tensor, H: torch.Tensor, alive: torch.Tensor, solve) -> Solution:
    """Run ``solve(W, H, alive)`` with the first ``len(order)`` columns permuted by ``order`` (the
    bias column stays last) and the solution's columns put back: OBS is the same problem in any
    column order, and N:M runs must be consecutive for the solvers."""
    P = torch.cat([order, torch.arange(len(order), W.shape[1])])
    back = torch.argsort(P)
    solution = solve(W[:, P], H[P][:, P], alive[:, P])
    solution.W, solution.keep = solution.W[:, back], solution.keep[:, back]
    return solution


def _check_epsilon(epsilon, where: str):
    """None, a tolerable error ε > 0, or ``{layer: ε}``."""
    if epsilon is None:
        return None
    if isinstance(epsilon, dict):
        return {
            str(k): check_number(f"epsilon[{k!r}]", v, where=where, low=0.0, closed="neither")
            for k, v in epsilon.items()
        }
    return check_number("epsilon", epsilon, where=where, low=0.0, closed="neither")


def weight_matrix_with_bias(W: torch.Tensor, bias) -> torch.Tensor:
    return torch.cat([W, bias.detach().double()[:, None]], dim=1) if bias is not None else W


@CRITERIA.register("lobs", "l-obs")
class LOBS(LayerwiseOBS):
    """The paper's L-OBS (Dong et al. 2017): one ranking by ``w²/(2[H⁻¹]_qq)``, compensating
    updates without down-dating ``H⁻¹``."""

    name = "lobs"

    def _solve(self, W, H, n_prune, prunable, alive, epsilon, limit, nm=None):
        return lobs.solve(W, H, n_prune, prunable, alive, epsilon=epsilon, limit=limit, nm=nm)


@CRITERIA.register("obs-exact", "obs_exact")
class OBSExact(LayerwiseOBS):
    """Greedy OBS with exact inverse down-dates (Optimal Brain Compression)."""

    name = "obs-exact"

    def _solve(self, W, H, n_prune, prunable, alive, epsilon, limit, nm=None):
        return obs_exact.solve(W, H, n_prune, prunable, alive, epsilon=epsilon, limit=limit, nm=nm)


@CRITERIA.register("obs-fast", "obs_fast")
class OBSFast(LayerwiseOBS):
    """Blocked OBS with one Cholesky factor of ``H⁻¹`` (SparseGPT)."""

    name = "obs-fast"

    def _solve(self, W, H, n_prune, prunable, alive, epsilon, limit, nm=None):
        return obs_fast.solve(W, H, n_prune, prunable, alive, block_size=self.block_size, nm=nm)
