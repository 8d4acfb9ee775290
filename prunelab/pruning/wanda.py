"""Wanda: pruning by weights and activations (Sun et al. 2023; docs/methods.md §1).

For a layer ``z = W x`` the score of weight ``W_ij`` is

    S_ij = |W_ij| · ‖X_j‖₂,       ‖X_j‖₂ = sqrt(Σ_k x_{k,j}²)

over every input column ``x_k`` the calibration data sends through the layer: every token of a
sequence, every sliding-window patch of a convolution. A weight matters as much as its size
times the size of the input it multiplies. Only the diagonal of ``XᵀX`` is needed, so the
statistics are one vector per layer (per row block), never a ``d × d`` matrix.

The input columns are those of the layer-wise Hessians (:mod:`prunelab.pruning.lobs.hessian`:
``columns`` and its hook sites), so Wanda sees the same target kinds: Linear, HF ``Conv1D``,
Conv (grouped and depthwise: one norm vector per group), MultiheadAttention's ``in_proj`` (q, k,
v blocks from their own inputs) and ``out_proj`` (the recomputed attention context), RNN
``weight_ih_l0`` and a one-layer RNN's ``weight_hh_l0``. Default targets of other kinds are
left dense (listed in ``criterion.skipped``, with a :class:`LayerSkipped` warning); named ones
are refused.

The paper compares scores within each output row: ``row`` is this criterion's default scope
(:class:`prunelab.pruning.scopes.Row`); every other scope, schedule and granularity works too.
The Pruner scores and selects one layer at a time (under every scope but ``global``), so the
scores of one layer exist at once.

Two variants. Without ``blocks`` the statistics come from the model as it is at the prune, in
one pass over the calibration batches. With ``blocks`` (the stack of blocks, e.g.
``"model.layers"``; the paper's variant) the calibration runs through block i only, on the
inputs the pruned blocks before it give: its layers' norms come from one pass of the dense block
i, its layers are pruned, and block i runs again with its pruned weights to make block i+1's
inputs (:class:`prunelab.pruning.lobs.sequential.SequentialHessians`' cache of block inputs;
layers outside the stack are scored from a forward of the whole model as pruned so far). Only
one block's inputs are held, ``offload="disk"`` spills them to a temporary directory,
``progress`` shows a bar over the blocks, ``compute_dtype="float32"`` runs the block being
served in float32 (a bfloat16/float16 model), and ``criterion.last_report`` (also
``pruner.history[-1].report``) gives each layer's seconds and peak memory, with block totals.
Scope ``global`` does not apply block by block (a block is pruned before the next block's inputs
exist).

    prune(model, 0.5, criterion="wanda", data=batches)            # 50 % of every row
    prune(model, None, criterion="wanda", granularity="2:4", data=batches)
    prune(model, 0.5, criterion="wanda", data=batches, blocks="model.layers", offload="disk")
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab._memory import PeakMemory
from prunelab._validation import Options, Types, validate_params
from prunelab.inputs import forward_batches
from prunelab.pruning import blocks as blk
from prunelab.pruning.criteria import CRITERIA, Criterion
from prunelab.pruning.lobs import Report, hessian
from prunelab.pruning.lobs.sequential import SequentialHessians
from prunelab.pruning.problems import PruneSetting
from prunelab.pruning.targets import Target


class InputNorms(hessian.InputHooks):
    """Forward hooks summing ``Σ x_j²`` over a set of targets' input columns (float64), one
    vector per row block: ``(groups, d)``."""

    def __init__(self, targets: Sequence[Target], parents: dict):
        self.targets, self.parents = list(targets), parents
        self.sums: dict[str, torch.Tensor] = {}
        self.columns: dict[str, int] = {}
        self._handles = []

    def _hook_for(self, target: Target, site: nn.Module):
        def hook(module, args, kwargs, output):
            cols, _ = hessian.columns(target, self.parents, site, args, kwargs, output)
            parts = list(cols)  # (groups, n, d) tensor or a list of (n_g, d)
            squares = torch.stack(
                [torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).double().pow(2) for x in parts]
            )
            name = target.name
            self.sums[name] = squares if name not in self.sums else self.sums[name] + squares
            self.columns[name] = self.columns.get(name, 0) + len(parts[0])

        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        """``{target: ‖X_j‖₂ as (groups, d)}``."""
        missing = [t.name for t in self.targets if t.name not in self.sums]
        if missing:
            raise ValueError(f"wanda: the calibration forward never reached {', '.join(missing)}.")
        return {name: s.sqrt() for name, s in self.sums.items()}


def input_norms(model: nn.Module, targets: Sequence[Target], batches) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` (eval mode, no grad) and return each target's input
    column norms ``‖X_j‖₂`` as ``(groups, d)`` (d in the order of ``target.matrix()``'s columns;
    one row per row block with its own inputs: conv groups, MultiheadAttention's q/k/v)."""
    parents = hessian.attention_parents(model)
    for target in targets:
        hessian.check_target(target, "wanda", parents)
    recorder = InputNorms(targets, parents)
    with torch.no_grad(), eval_mode(model), hessian.calibration_mode(model), recorder:
        forward_batches(model, batches)
    return recorder.norms()


def wanda_scores(target: Target, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` shaped like the weight, from the ``(groups, d)`` norms."""
    W = target.matrix().float().abs()
    groups = norms.shape[0]
    if W.shape[0] % groups or W.shape[1] != norms.shape[1]:
        raise ValueError(
            f"wanda: the inputs of {target.name!r} ({tuple(norms.shape)}) do not fit its "
            f"weight matrix {tuple(W.shape)}; was the model changed since calibration?"
        )
    blocks = W.reshape(groups, W.shape[0] // groups, -1) * norms.float().to(W.device)[:, None, :]
    scores = blocks.reshape(W.shape)
    return scores.t() if target.layout == "transposed" else scores.reshape(target.weight.shape)


@CRITERIA.register("wanda")
class Wanda(Criterion):
    """``|W_ij| · ‖X_j‖₂`` from calibration inputs (Sun et al. 2023), ranked within each output
    row by default (scope ``row``). With ``blocks`` it prunes block by block (see the module
    docstring; ``offload``, ``progress``, ``compute_dtype`` are options of that variant)."""

    name = "wanda"
    needs_data = True
    default_scope = "row"

    @validate_params(
        {
            "blocks": [
                Types(str, nn.Module, name="a dotted module path such as 'model.layers' or an nn.ModuleList"),
                None,
            ],
            "offload": [Options(blk.OFFLOADS), None],
            "progress": [bool, None],
            "compute_dtype": [Types(str, torch.dtype), None],
        },
        where="wanda criterion",
    )
    def __init__(self, blocks=None, offload: str | None = None, progress: bool | None = None, compute_dtype=None):
        where = "wanda criterion"
        if blocks is None and (offload == "disk" or progress or compute_dtype is not None):
            raise ValueError(
                f"the 'offload', 'progress' and 'compute_dtype' parameters of {where} apply block "
                f"by block: name the stack of blocks too (blocks='model.layers', say)."
            )
        self.blocks, self.offload, self.progress = blk.check_block_options(
            blocks, offload, progress, "sequential", where
        )
        self.compute_dtype = blk.check_compute_dtype(compute_dtype, "sequential", where)
        self.updates_weights = blocks is not None  # block by block it prunes as it goes
        self._stack: nn.Module | None = None
        self._norms: dict[str, torch.Tensor] | None = None
        self._batches: list | None = None
        self.skipped: dict[str, str] = {}  # default targets left dense: {name: reason}
        self.last_report: NormReport | None = None
        self.last_held: tuple[str, ...] = ()

    def validate(self, setting: PruneSetting) -> None:
        self.skipped = hessian.skip_unsupported(setting, "wanda", verb="score")
        if self.blocks is None:
            return
        self._stack = blk.resolve_stack(setting.model, self.blocks, where="wanda criterion")
        if not setting.scope.independent:
            raise ValueError(
                f"scope {setting.scope.name!r} ranks every layer's scores at once; block by block "
                f"a block is pruned before the next block's inputs exist: use scope 'row' (the "
                f"default), 'local' or 'layerwise-constant', or leave out 'blocks'."
            )

    def calibrate(self, model, targets, batches, loss_fn) -> None:
        """Collect ``‖X_j‖₂`` of every target's inputs over ``batches`` (any form
        :mod:`prunelab.inputs` reads; the loss is not used). Block by block the batches are kept
        for :meth:`solve`, which collects the norms of one block at a time."""
        batches, _ = self._calibration(batches, loss_fn)
        if self.blocks is not None:
            self._batches = batches
            return
        chosen = [t for t in targets if t.name not in self.skipped]
        self._norms = input_norms(model, chosen, batches)

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        return list(self.iter_scores(targets))

    def iter_scores(self, targets: Sequence[Target]):
        if self._norms is None:
            raise ValueError(
                "the wanda criterion has no input norms to score with: pass calibration data "
                "(prune(..., data=batches), Pruner(..., calibration=batches) or pruner.calibrate(data))"
                + (" and, block by block, prune through the Pruner." if self.blocks is not None else ".")
            )
        missing = [t.name for t in targets if t.name not in self._norms]
        if missing:
            raise ValueError(f"wanda: calibrated without {', '.join(missing)}; calibrate on the same layers.")
        for t in targets:
            yield wanda_scores(t, self._norms[t.name])

    @torch.no_grad()
    def solve(self, request) -> list[torch.Tensor]:
        """Block by block: prune every target (scored from its block's norms, selected by the
        scope through ``request.select``) and return the keep-masks, one per ``request.targets``
        (a :class:`prunelab.pruning.problems.SolveRequest`)."""
        if self._batches is None:
            raise ValueError(
                "the wanda criterion needs calibration data: pass data= to prune() or calibration= to the Pruner."
            )
        self.last_report, self.last_held = _BlockByBlock(self, request).run(request.sparsities)
        masks = request.masks
        return [
            masks.get(t.weight) if t.weight in masks else torch.ones_like(t.weight, dtype=torch.bool)
            for t in request.targets
        ]

    def reset(self) -> None:
        self._norms, self._batches = None, None

    @property
    def norms(self) -> dict[str, torch.Tensor] | None:
        """The last calibration's ``{target: ‖X_j‖₂ (groups, d)}`` (the one-pass variant)."""
        return self._norms

    def __repr__(self) -> str:
        return "Wanda()" if self.blocks is None else f"Wanda(blocks={self.blocks!r})"


@dataclass(frozen=True)
class NormLayerReport:
    """One layer of a block-by-block Wanda prune."""

    layer: str
    shape: tuple
    sparsity: float  # realised, of the weight
    n: int  # calibration columns (samples × positions)
    norm_seconds: float  # the pass that gave its block's norms (paid by the block's first layer)
    select_seconds: float  # scores, selection, mask
    block: str | None = None  # the block the layer is in (None: outside the stack)
    seconds: float = 0.0  # wall time of the layer, its share of the block's inputs included
    peak_memory: int | None = None  # bytes: the process's resident high-water mark meanwhile
    live_bytes: int = 0  # bytes of cached block inputs in memory and norms held meanwhile

    def as_dict(self) -> dict:
        return asdict(self)


class NormReport(Report):
    """The per-layer reports of a block-by-block Wanda prune (block totals, trace time and the
    whole prune's peak as in :class:`prunelab.pruning.lobs.Report`)."""

    def _width(self) -> int:
        return max([14] + [len(r.layer) for r in self])

    def _head(self) -> str:
        w = self._width()
        return f"{'layer':<{w}} {'sparsity':>8} {'n':>8} {'norms s':>8} {'select s':>8} {'total s':>8} {'peak MiB':>9}"

    def _row(self, r) -> str:
        return (
            f"{r.layer:<{self._width()}} {r.sparsity:8.4f} {r.n:8d} {r.norm_seconds:8.3f} "
            f"{r.select_seconds:8.3f} {r.seconds:8.3f} {blk.mib(r.peak_memory):>9}"
        )

    def totals(self) -> dict:
        return {
            "norm_seconds": sum(r.norm_seconds for r in self),
            "select_seconds": sum(r.select_seconds for r in self),
            "seconds": sum(r.seconds for r in self) + self.trace_seconds,
        }


class _BlockByBlock:
    """One block-by-block prune: for each run of consecutive targets in one block, the block's
    norms from one pass on its cached inputs, then each target scored, selected (the Pruner's
    scope) and zeroed; the next block's inputs come from this block as pruned."""

    def __init__(self, criterion: Wanda, request):
        self.criterion, self.request, self.event = criterion, request, request.event
        self.active = [t for t in request.targets if t.name not in criterion.skipped]
        self.index = {t.name: i for i, t in enumerate(self.active)}  # the scope's layer numbers
        self.memory: dict = {}  # the whole prune's peak, across the per-layer resets

    def run(self, sparsities: list[float]) -> tuple[NormReport, tuple[str, ...]]:
        c, request = self.criterion, self.request
        assert c._batches is not None  # solve() checked
        wanted = {t.name: s for t, s in zip(request.targets, sparsities)}
        report, held = NormReport(), []
        report.skipped = dict(c.skipped)
        spill = blk.Spill() if c.offload == "disk" else None
        self.inputs, bar = None, None
        try:
            with eval_mode(request.model):
                started = time.perf_counter()
                with PeakMemory(self.memory):
                    self.inputs = SequentialHessians(
                        request.model,
                        self.active,
                        c._batches,
                        with_bias=False,
                        stack=c._stack,
                        spill=spill,
                        compute=c.compute_dtype,
                    )
                report.trace_seconds = time.perf_counter() - started
                shown = sys.stderr.isatty() if c.progress is None else c.progress
                bar = blk.BlockBar(self.active, self.inputs.block_name, shown, c.name)
                for block, members in self._runs():
                    recorder = None  # the block's norms, made when its first layer is pruned
                    for target in members:
                        recorder, layer_report, was_held = self._layer(
                            target, block, members, recorder, wanted[target.name]
                        )
                        report.append(layer_report)
                        if was_held:
                            held.append(target.name)
                        bar.step(target)
        finally:
            if bar is not None:
                bar.close()
            if self.inputs is not None:
                self.inputs.forget()
            if spill is not None:
                spill.close()
        report.peak_memory = self.memory.get("overall")
        return report, tuple(held)

    def _layer(self, target, block, members, recorder, sparsity):
        """Prune one target, its block's norms first if not made yet; its report, timed and with
        its peak memory."""
        started = time.perf_counter()
        with PeakMemory(self.memory) as peak:
            norm_seconds = 0.0
            if recorder is None:
                recorder, norm_seconds = self._norms(block, members)
            assert self.inputs is not None  # run() made it
            live = self.inputs.cached_bytes() + sum(v.numel() * v.element_size() for v in recorder.sums.values())
            chosen = time.perf_counter()
            held = self._prune(target, recorder.sums.pop(target.name).sqrt(), sparsity)
            select_seconds = time.perf_counter() - chosen
        weight = target.weight
        report = NormLayerReport(
            layer=target.name,
            shape=tuple(weight.shape),
            sparsity=1.0 - int(torch.count_nonzero(weight)) / weight.numel(),
            n=recorder.columns[target.name],
            norm_seconds=norm_seconds,
            select_seconds=select_seconds,
            block=None if block is None else self.inputs.block_name[target.name],
            seconds=time.perf_counter() - started,
            peak_memory=peak.peak,
            live_bytes=live,
        )
        return recorder, report, held

    def _runs(self):
        """``(block, [targets])`` for each run of consecutive targets in one block (None: outside)."""
        assert self.inputs is not None  # run() made it
        runs = []
        for target in self.active:
            block = self.inputs.block[target.name]
            if runs and runs[-1][0] is block:
                runs[-1][1].append(target)
            else:
                runs.append((block, [target]))
        return runs

    def _norms(self, block, members) -> tuple[InputNorms, float]:
        """The members' input norms: one pass of their block alone on its cached inputs, or of
        the whole model as pruned so far for layers outside the stack."""
        started = time.perf_counter()
        model, inputs, batches = self.request.model, self.inputs, self.criterion._batches
        assert inputs is not None and batches is not None  # run() made the inputs; solve() checked the batches
        recorder = InputNorms(members, inputs.parents)
        if block is None:
            inputs.forget()  # the whole model runs: a cache would be stale after this prune
            with hessian.calibration_mode(model), recorder:
                forward_batches(model, batches)
        else:
            cache = inputs.block_inputs(block)
            sites = [inputs.sites[t.name] for t in members]
            early = sites if all(id(site) in inputs.trace.once for site in sites) else ()
            with hessian.calibration_mode(model), recorder:
                blk.run_block(block, cache, keep=False, stop_after=early)
            inputs.forwards["block"] += len(batches)
        recorder.norms()  # raises if a member was never reached
        return recorder, time.perf_counter() - started

    def _prune(self, target: Target, norm: torch.Tensor, sparsity: float) -> bool:
        """Score, select and zero one target; whether the no-empty-layer guard held it."""
        request = self.request
        score = wanda_scores(target, norm)
        group_keep, held = request.select(
            target, score, sparsity, self.event, self.index[target.name], len(self.active)
        )
        del score
        request.store(target, group_keep)
        mask = request.masks.get(target.weight)
        if mask is not None:  # now: the next block's inputs come from the pruned weights
            target.weight.masked_fill_(~mask, 0)
        assert self.inputs is not None  # run() made it
        self.inputs.pruned(target)
        return held
