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
holds a :class:`LayerReport` per layer.

Scopes: ``local`` prunes every layer to the target; ``layerwise-constant`` too, raising one
layer per schedule event, round-robin, and every layer at the last; ``global`` (weight
granularity) ranks every weight of every layer by its L-OBS sensitivity ``w_q²/(2[H⁻¹]_qq)``
on the weights before the prune and cuts at one threshold, as the paper's single tolerable
error ε does, then lets each solver reach the layer sparsities that threshold gives (in
sequential mode the later layers are re-solved on the outputs of the pruned earlier ones).

Like every scope, the solvers never empty a layer: at most ``numel − min_keep`` weights (or
``n_inputs − min_keep`` channels) of a layer go, whatever the target or ε asks; the layers so
held are listed in ``criterion.last_held`` (and the Pruner's record). Weights of *dead*
inputs (zero on every calibration sample) are removed first at no cost; those the target does
not remove keep their values.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch

from prunelab._validation import check_choice, check_number
from prunelab.pruning.criteria import CRITERIA, Criterion
from prunelab.pruning.lobs import hessian, lobs, obs_exact, obs_fast, structured
from prunelab.pruning.lobs.common import inverse
from prunelab.pruning.lobs.hessian import LayerHessian, check_target, weight_matrix
from prunelab.pruning.scopes import LayerGroups

MODES = ("sequential", "parallel")


@dataclass(frozen=True)
class LayerReport:
    """One layer of an L-OBS prune. Errors are root-mean-square over the n calibration
    columns: ``√E`` with ``E = (1/n)‖Ẑ − Z‖²_F`` (Z from the weights before this prune,
    on this prune's calibration inputs); ``measured`` uses the undamped Hessian, which makes
    it exactly ``‖(Ŵ − W) X̃‖/√n``."""

    layer: str
    shape: tuple
    sparsity: float            # realised, of the weight
    predicted_error: float     # √(predicted E) from the solver's sensitivities
    measured_error: float      # ‖Ẑ − Z‖/√n
    relative_error: float      # ‖Ẑ − Z‖ / ‖Z‖
    n: int                     # calibration columns (samples × positions)
    hessian_seconds: float
    solve_seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


class Report(list):
    """The per-layer reports of one prune, printable as a table."""

    def __str__(self) -> str:
        head = (f"{'layer':<14} {'sparsity':>8} {'predicted':>10} {'measured':>10} {'relative':>9} "
                f"{'n':>8} {'hessian s':>9} {'solve s':>8}")
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r.layer:<14} {r.sparsity:8.4f} {r.predicted_error:10.4g} {r.measured_error:10.4g} "
                         f"{r.relative_error:9.4f} {r.n:8d} {r.hessian_seconds:9.3f} {r.solve_seconds:8.3f}")
        return "\n".join(lines)

    def totals(self) -> dict:
        return {"hessian_seconds": sum(r.hessian_seconds for r in self),
                "solve_seconds": sum(r.solve_seconds for r in self)}


class LayerwiseOBS(Criterion):
    """Shared driver of the three solvers; subclasses set ``name`` and ``_solve``."""

    needs_data = True
    updates_weights = True

    def __init__(self, mode: str = "sequential", damping: float = 1e-2, update_bias: bool = True,
                 low_memory: bool = False, block_size: int = 128, epsilon=None):
        where = f"{self.name} criterion"
        self.epsilon = _check_epsilon(epsilon, where)
        self.mode = check_choice("mode", mode, MODES, where=where)
        self.damping = check_number("damping", damping, where=where, low=0.0)
        if not isinstance(update_bias, bool) or not isinstance(low_memory, bool):
            raise TypeError(f"the 'update_bias' and 'low_memory' parameters of {where} must be bools.")
        self.update_bias, self.low_memory = update_bias, low_memory
        self.block_size = check_number("block_size", block_size, where=where, low=1, integer=True)
        self._batches: list | None = None
        self._original = None
        self._hessians: dict[str, LayerHessian] = {}
        self.last_report: Report | None = None
        self.last_held: tuple[str, ...] = ()

    # ------------------------------------------------------------ data
    def calibrate(self, model, targets, batches, loss_fn) -> None:
        for target in targets:
            check_target(target, self.name)
        self._batches, _ = self._calibration(batches, loss_fn)
        if self.mode == "parallel":
            if self.low_memory:
                self._original = copy.deepcopy(model)   # Hessians later, one layer at a time
            else:
                self._hessians = hessian.collect(model, targets, self._batches, with_bias=self.update_bias)

    def reset(self) -> None:
        self._batches, self._original, self._hessians = None, None, {}

    def validate(self, pruner) -> None:
        for target in pruner.targets:
            check_target(target, self.name)
        if pruner.granularity.name not in ("weight", "channel"):
            raise ValueError(f"{self.name} prunes at granularity 'weight' (unstructured) or 'channel' "
                             f"(whole inputs, block OBS); got {pruner.granularity.name!r}.")
        if pruner.granularity.name == "channel" and self.name != "obs-exact":
            raise ValueError(f"the structured (channel) variant is the greedy block OBS: use criterion "
                             f"'obs-exact' with granularity 'channel' (got {self.name!r}).")
        if self.epsilon is not None and self.name == "obs-fast":
            raise ValueError("obs-fast takes sparsity targets only (its masks come from fractions); use "
                             "'lobs' or 'obs-exact' with the tolerable error epsilon.")
        if isinstance(self.epsilon, dict):
            names = {t.name for t in pruner.targets} | {t.module_name for t in pruner.targets}
            unknown = sorted(set(self.epsilon) - names)
            if unknown:
                raise ValueError(f"the 'epsilon' parameter of {self.name} names {unknown[0]!r}, not a pruned "
                                 f"layer; pruned layers: {', '.join(t.module_name for t in pruner.targets)}.")
        if pruner.scope.name == "global":
            if pruner.granularity.name != "weight":
                raise ValueError(f"scope 'global' for {self.name} shares the target by ranking single weights: "
                                 f"use granularity 'weight', or scope 'local' with granularity "
                                 f"{pruner.granularity.name!r}.")
            if self.epsilon is not None:
                raise ValueError(f"the tolerable error 'epsilon' of {self.name} already decides every layer's "
                                 f"sparsity (one ε for all layers is the paper's rule); leave out scope "
                                 f"'global', or give a sparsity target instead of epsilon.")

    def scores(self, targets):
        raise ValueError(f"{self.name} is a solver: it prunes through Pruner/prune(), not by scores.")

    def _hessian(self, pruner, target) -> LayerHessian:
        if self._batches is None:
            raise ValueError(f"criterion {self.name!r} needs calibration data: pass calibration=(x, y) "
                             f"to the Pruner, or data= to prune().")
        if self.mode == "sequential":
            return hessian.collect(pruner.model, [target], self._batches, with_bias=self.update_bias)[target.name]
        if self.low_memory:
            twin = dict(self._original.named_modules())[target.module_name]
            copy_target = type(target)(target.name, target.module_name, twin, target.param_name)
            return hessian.collect(self._original, [copy_target], self._batches,
                                   with_bias=self.update_bias)[target.name]
        return self._hessians[target.name]

    # ----------------------------------------------------------- solve
    @torch.no_grad()
    def solve(self, pruner, sparsities: list[float], event) -> list[torch.Tensor]:
        structured_mode = pruner.granularity.name == "channel"
        keeps, report, held = [], Report(), []
        raised = range(len(pruner.targets))
        if pruner.scope.name == "global":
            sparsities, held = self._global_allocation(pruner, sparsities[0], event)
        elif pruner.scope.name == "layerwise-constant" and not event.final:
            raised = {event.index % len(pruner.targets)}     # one layer per event, round-robin
        for i, (target, sparsity) in enumerate(zip(pruner.targets, sparsities)):
            if i not in raised:
                mask = pruner.masks.get(target.weight)
                keeps.append(torch.ones_like(target.weight, dtype=torch.bool) if mask is None else mask.bool())
                continue
            h = self._hessian(pruner, target)
            started = time.perf_counter()
            W = weight_matrix(target).double()
            bias = target.module.bias if h.with_bias else None
            W_full = torch.cat([W, bias.detach().double()[:, None]], dim=1) if bias is not None else W
            H, W_full, dead = hessian.prepare(h, W_full, self.damping)
            d_in = W.shape[1]
            prunable = torch.zeros(W_full.shape[1], dtype=torch.bool)
            prunable[:d_in] = True
            mask = pruner.masks.get(target.weight)
            alive = torch.ones_like(W_full, dtype=torch.bool)
            if mask is not None:
                alive[:, :d_in] = mask.reshape(W.shape[0], -1).bool()
            if structured_mode:
                solution = self._structured(target, W_full, H, sparsity, alive, d_in, pruner.min_keep)
            else:
                limit = W.numel() - min(pruner.min_keep, int(alive[:, :d_in].sum()))   # never empty the layer
                wanted = round(sparsity * W.numel())
                solution = self._solve(W_full, H, min(wanted, limit), prunable, alive,
                                       self._epsilon_for(target), limit)
                solution.held = solution.held or (self._epsilon_for(target) is None and wanted > limit)
            if solution.held:
                held.append(target.name)
            # prepare() zeroed the weights of dead inputs so that they go first, at no cost; those
            # the solver kept get their values back (they cannot change the calibration outputs)
            revived = dead[None, :d_in] & solution.keep[:, :d_in]
            new_W = torch.where(revived, W[:, :d_in], solution.W[:, :d_in]).reshape(target.weight.shape)
            keep = solution.keep[:, :d_in].reshape(target.weight.shape)
            delta = solution.W - weight_matrix_with_bias(W, bias)
            measured = float(torch.einsum("ri,ij,rj->", delta, h.H, delta)) if h.n else 0.0
            reference = weight_matrix_with_bias(W, bias)
            signal = float(torch.einsum("ri,ij,rj->", reference, h.H, reference))
            target.weight.copy_(new_W.to(target.weight.dtype) * keep)
            if bias is not None:
                bias.copy_(solution.W[:, d_in].to(bias.dtype))
            keeps.append(keep)
            report.append(LayerReport(
                layer=target.name, shape=tuple(target.weight.shape),
                sparsity=1.0 - float(keep.float().mean()),
                predicted_error=math.sqrt(max(solution.predicted, 0.0)),
                measured_error=math.sqrt(max(measured, 0.0)),
                relative_error=math.sqrt(max(measured, 0.0) / signal) if signal > 0 else 0.0,
                n=h.n, hessian_seconds=h.seconds, solve_seconds=time.perf_counter() - started))
        self.last_report = report
        self.last_held = tuple(held)
        return keeps

    def _global_allocation(self, pruner, sparsity: float, event) -> tuple[list[float], list[str]]:
        """Scope ``global``: one threshold on the sensitivities ``L_q = w_q²/(2[H⁻¹]_qq)`` of every
        weight of every layer (the paper's single tolerable error ε, set by the target instead of
        given), computed on the weights before this prune with the Hessians of the model as it is
        now. Returns each layer's sparsity, for the solver to reach in its own order, and the
        layers the no-empty-layer guard held."""
        together = None
        if self.mode == "sequential" and not self.low_memory:
            together = hessian.collect(pruner.model, pruner.targets, self._batches, with_bias=self.update_bias)
        layers = []
        for target in pruner.targets:
            h = together[target.name] if together is not None else self._hessian(pruner, target)
            W = weight_matrix(target).double()
            bias = target.module.bias if h.with_bias else None
            H, W_full, _ = hessian.prepare(h, weight_matrix_with_bias(W, bias), self.damping)
            d_in = W.shape[1]
            L = W_full[:, :d_in].pow(2) / (2 * torch.diagonal(inverse(H))[:d_in])
            mask = pruner.masks.get(target.weight)
            alive = torch.ones(L.numel(), dtype=torch.bool) if mask is None else mask.flatten().bool()
            layers.append(LayerGroups(L.flatten(), alive, 1))
        keeps = pruner.scope.select(layers, sparsity, event, pruner.min_keep)
        held = pruner._held_by_guard(layers, sparsity, event, keeps)
        return [1.0 - int(k.sum()) / k.numel() for k in keeps], list(held)

    def _structured(self, target, W_full, H, sparsity, alive, d_in, min_keep):
        module = target.module
        group = module.kernel_size[0] * module.kernel_size[1] if isinstance(module, torch.nn.Conv2d) else 1
        n_inputs = d_in // group
        alive_groups = alive[:, :d_in].reshape(-1, n_inputs, group).all(dim=2).all(dim=0)
        limit = n_inputs - min(min_keep, int(alive_groups.sum()))     # never empty the layer
        wanted = round(sparsity * n_inputs)
        solution = structured.solve(W_full, H, min(wanted, limit), group, n_inputs, alive_groups)
        solution.held = wanted > limit
        return solution

    def _epsilon_for(self, target) -> float | None:
        if isinstance(self.epsilon, dict):
            return self.epsilon.get(target.name, self.epsilon.get(target.module_name))
        return self.epsilon

    def _solve(self, W, H, n_prune, prunable, alive, epsilon, limit):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, damping={self.damping:g})"


def _check_epsilon(epsilon, where: str):
    """None, a tolerable error ε > 0, or ``{layer: ε}``."""
    if epsilon is None:
        return None
    if isinstance(epsilon, dict):
        return {str(k): check_number(f"epsilon[{k!r}]", v, where=where, low=0.0, closed="neither")
                for k, v in epsilon.items()}
    return check_number("epsilon", epsilon, where=where, low=0.0, closed="neither")


def weight_matrix_with_bias(W: torch.Tensor, bias) -> torch.Tensor:
    return torch.cat([W, bias.detach().double()[:, None]], dim=1) if bias is not None else W


@CRITERIA.register("lobs", "l-obs")
class LOBS(LayerwiseOBS):
    """The paper's L-OBS (Dong et al. 2017): one ranking by ``w²/(2[H⁻¹]_qq)``, compensating
    updates without down-dating ``H⁻¹``."""

    name = "lobs"

    def _solve(self, W, H, n_prune, prunable, alive, epsilon, limit):
        return lobs.solve(W, H, n_prune, prunable, alive, epsilon=epsilon, limit=limit)


@CRITERIA.register("obs-exact", "obs_exact")
class OBSExact(LayerwiseOBS):
    """Greedy OBS with exact inverse down-dates (Optimal Brain Compression)."""

    name = "obs-exact"

    def _solve(self, W, H, n_prune, prunable, alive, epsilon, limit):
        return obs_exact.solve(W, H, n_prune, prunable, alive, epsilon=epsilon, limit=limit)


@CRITERIA.register("obs-fast", "obs_fast")
class OBSFast(LayerwiseOBS):
    """Blocked OBS with one Cholesky factor of ``H⁻¹`` (SparseGPT)."""

    name = "obs-fast"

    def _solve(self, W, H, n_prune, prunable, alive, epsilon, limit):
        return obs_fast.solve(W, H, n_prune, prunable, alive, block_size=self.block_size)
