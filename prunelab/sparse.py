"""Sparse inference: run highly sparse Linear layers as CSR sparse-matrix products (docs/methods.md §6).

    from prunelab.sparse import sparsify, densify
    fast, report = sparsify(model, (1, 28, 28), min_sparsity=0.9)   # a copy; the model is untouched
    print(report)                     # per Linear: sparsity, dense vs sparse ms, replaced or not, why
    model_again = densify(fast)       # plain nn.Linear layers again, bit for bit

Zero weights cost as much as any others in a dense matrix product. :class:`SparseLinear` keeps only
the non-zeros, in compressed sparse row (CSR) form, and multiplies with them alone, so its cost
grows with the number of non-zeros instead of ``in × out``. It is for **inference only**: its
tensors are buffers, not parameters (an optimiser does not see them, no gradient reaches them), and
the pruning machinery (``Pruner``, ``prunelab.units``) works on ``nn.Linear`` layers only; call
:func:`densify` to go back.

The layer, and which of three torch kernels its forward pass picks by the number of input rows, is
in :mod:`prunelab.models.sparse`; this module holds the tools around it. Whether the sparse layer
beats the dense one depends on the machine, the thread count, the layer's shape and its sparsity,
which is why :func:`sparsify` measures each layer before replacing it. ``docs/sparse.md`` has the
tables.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from numbers import Integral
from typing import cast

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab._validation import (
    BATCH_SIZE,
    FRACTION,
    MAPPING,
    MAX_BATCH,
    MAX_REPEATS,
    MODEL,
    THREADS,
    Constraint,
    Interval,
    Sizes,
    check_param,
    check_type,
    validate_params,
)
from prunelab.inputs import Batch, example_batch, logits_of
from prunelab.metrics.dry_run import SHAPE, default_device_dtype
from prunelab.metrics.flops import count_nonzero
from prunelab.metrics.latency import measure_latency
from prunelab.models.sparse import MANY_ROWS, SUPPORTED_DTYPES, SparseLinear, check_dtype  # noqa: F401 (public here too)

__all__ = [
    "MANY_ROWS",
    "InferenceLatency",
    "LayerDecision",
    "SparseLinear",
    "SparsifyReport",
    "compare_latency",
    "densify",
    "inference_latency",
    "sparsify",
]

#: What the functions that time models interleaved declare.
_ROUNDS: dict[str, list[Constraint | None]] = {
    "threads": [THREADS, None],
    "rounds": [Interval(Integral, 1, MAX_REPEATS)],
    "repeats": [Interval(Integral, 1, MAX_REPEATS)],
    "warmup": [Interval(Integral, 0, MAX_REPEATS)],
}
_EXAMPLE: dict[str, list[Constraint | None]] = {"model": [MODEL], "input_shape": [SHAPE, None]}


#: Modules that read the weights of their Linear children directly (the fused fast path of
#: ``nn.TransformerEncoderLayer``/``DecoderLayer``; ``nn.MultiheadAttention`` reads ``out_proj.weight``,
#: a Linear subclass that :func:`_is_plain_linear` already leaves alone).
_WEIGHT_READING_PARENTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention)


def _is_plain_linear(module: nn.Module) -> bool:
    # subclasses (e.g. the out_proj of nn.MultiheadAttention, whose weight its parent reads
    # directly) are left alone
    return type(module) is nn.Linear


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` is; the new root when ``name`` is ``""``."""
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


@validate_params({"model": [MODEL]})
def densify(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`SparseLinear` turned back into ``nn.Linear`` (exact).
    The given model is not modified."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            linear = module.to_linear()
            linear.train(module.training)
            model = _replace(model, name, linear)
    return model


@validate_params({"models": [MAPPING], "input_shape": [SHAPE, None], "batch_sizes": [Sizes(MAX_BATCH)], **_ROUNDS})
def compare_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int] | int | None = None,
    batch_sizes: Sequence[int] | int = (1, 64),
    *,
    example_inputs=None,
    threads: int | None = None,
    rounds: int = 7,
    repeats: int = 10,
    warmup: int = 3,
) -> dict[str, dict[int, float]]:
    """Median forward latency in ms of each model at each batch size, ``{name: {batch: ms}}``.

    The input is a random tensor ``(batch, *input_shape)`` (:func:`prunelab.measure_latency`)
    or ``example_inputs`` (tensor, tuple or dict) with its first example repeated to each batch size.

    The models are measured in ``rounds`` interleaved rounds (their order reversed every other
    round), each round one :func:`prunelab.measure_latency` call per model (``warmup`` untimed and
    ``repeats`` timed calls per batch size, ``threads`` torch threads); the result is the median
    over rounds of each round's median, so a drift of the machine affects all models alike.
    """
    where = "compare_latency"
    if not models:
        raise ValueError(f"the 'models' parameter of {where} must name at least one model. Got {{}} instead.")
    for name, model in models.items():
        check_param(f"models[{name!r}]", model, [MODEL], where=where)
    rounds = int(rounds)
    medians: dict[str, dict[int, list[float]]] = {name: {} for name in models}
    names = list(models)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            rows = {
                row.batch_size: row.median_ms
                for row in measure_latency(
                    models[name],
                    input_shape,
                    batch_sizes,
                    example_inputs=example_inputs,
                    warmup=warmup,
                    repeats=repeats,
                    threads=threads,
                )
            }
            for batch_size, ms in rows.items():
                medians[name].setdefault(batch_size, []).append(ms)
    return {name: {b: statistics.median(ms) for b, ms in rows.items()} for name, rows in medians.items()}


@dataclass(frozen=True)
class LayerDecision:
    """What :func:`sparsify` did with one ``nn.Linear``: ``sparsity`` of its weight, the measured
    median ``dense_ms``/``sparse_ms`` of the layer alone (``None`` when not measured), whether it
    was ``replaced`` by a :class:`SparseLinear` and ``reason``, in words."""

    name: str
    in_features: int
    out_features: int
    sparsity: float
    dense_ms: float | None
    sparse_ms: float | None
    replaced: bool
    reason: str

    @property
    def speedup(self) -> float | None:
        """``dense_ms / sparse_ms`` when both were measured."""
        if self.dense_ms is None or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass(frozen=True)
class SparsifyReport:
    """The per-layer decisions of :func:`sparsify` and the settings they were made with.
    ``print(report)`` shows a table; :meth:`to_dict` gives a JSON-serialisable record."""

    layers: tuple[LayerDecision, ...]
    min_sparsity: float
    only_if_faster: bool
    batch_size: int
    threads: int

    @property
    def replaced(self) -> list[str]:
        """Names of the layers that became :class:`SparseLinear`."""
        return [layer.name for layer in self.layers if layer.replaced]

    def to_dict(self) -> dict:
        return {
            "min_sparsity": self.min_sparsity,
            "only_if_faster": self.only_if_faster,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        headers = ("layer", "shape", "sparsity %", "dense ms", "sparse ms", "replaced", "why")

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        table = [
            (
                d.name or "(root)",
                f"{d.in_features}x{d.out_features}",
                f"{100 * d.sparsity:.2f}",
                ms(d.dense_ms),
                ms(d.sparse_ms),
                "yes" if d.replaced else "no",
                d.reason,
            )
            for d in self.layers
        ]
        widths = [max(len(str(cells[i])) for cells in [headers, *table]) for i in range(len(headers))]
        right = (False, False, True, True, True, False, False)
        lines = [
            "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()
            for cells in [headers, *table]
        ]
        timed = (
            f"timed alone at batch {self.batch_size}, {self.threads} thread(s)"
            if self.only_if_faster
            else "not timed (only_if_faster=False)"
        )
        footer = (
            f"{len(self.replaced)} of {len(self.layers)} Linear layer(s) replaced; "
            f"min_sparsity {100 * self.min_sparsity:g} %; {timed}"
        )
        return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:], footer])


def _linear_inputs(model: nn.Module, batch: Batch, where: str) -> dict[nn.Module, tuple[int, ...]]:
    """The input shape, without the batch dimension, of each plain Linear's first call on the example."""
    seen: dict[nn.Module, tuple[int, ...]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            seen.setdefault(module, tuple(args[0].shape[1:]) or (cast(nn.Linear, module).in_features,))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if _is_plain_linear(m)]
    try:
        _run(model, batch, where)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _example(model: nn.Module, input_shape, example_inputs, where: str) -> Batch:
    """The dry-run example on the model's device and (for float inputs) dtype."""
    check_type("model", model, nn.Module, where=where)
    device, dtype = default_device_dtype(model)
    return example_batch(model, input_shape, example_inputs, where=where, dtype=dtype, device=device)


def _run(model: nn.Module, batch: Batch, where: str):
    """``model`` on ``batch`` in eval mode without gradients (train flags restored); a failing
    forward becomes a ValueError carrying the model's error."""
    try:
        with eval_mode(model), torch.inference_mode():
            return batch.call(model)
    except Exception as err:
        tensors = batch.tensors()
        what = (
            f"an input of shape {tuple(tensors[0].shape)} ({tensors[0].dtype})"
            if len(tensors) == 1
            else "the example inputs (" + ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in tensors) + ")"
        )
        raise ValueError(
            f"{where} could not run {type(model).__name__} on {what}; check 'input_shape' (one "
            f"input, without the batch dimension) or 'example_inputs'. "
            f"The model raised {type(err).__name__}: {err}"
        ) from err


def _parent_reads_weight(model: nn.Module) -> dict[str, str]:
    """Plain Linear layers whose parent reads their ``weight`` tensor itself instead of calling
    them (PyTorch's fused Transformer fast path), ``{name: parent class}``: a CSR weight there
    would break the parent, so they stay dense."""
    found = {}
    for parent_name, parent in model.named_modules():
        if isinstance(parent, _WEIGHT_READING_PARENTS):
            for child_name, child in parent.named_children():
                if _is_plain_linear(child):
                    found[f"{parent_name}.{child_name}" if parent_name else child_name] = type(parent).__name__
    return found


@validate_params(
    {**_EXAMPLE, "min_sparsity": [FRACTION], "only_if_faster": [bool], "batch_size": [BATCH_SIZE], **_ROUNDS}
)
def sparsify(
    model: nn.Module,
    input_shape: Sequence[int] | int | None = None,
    *,
    example_inputs=None,
    min_sparsity: float = 0.9,
    only_if_faster: bool = True,
    batch_size: int = 1,
    threads: int | None = None,
    rounds: int = 15,
    repeats: int = 10,
    warmup: int = 3,
) -> tuple[nn.Module, SparsifyReport]:
    """A copy of ``model`` with sparse ``nn.Linear`` layers replaced by :class:`SparseLinear`.

    A Linear layer (exactly ``nn.Linear``, not a subclass) is replaced when the sparsity of its
    weight (fraction of exact zeros) is at least ``min_sparsity`` and, with ``only_if_faster``
    (the default), when the sparse layer alone runs faster than the dense one on this machine:
    both are timed on the layer's own input shape (found with a dry forward pass of a batch of 1,
    then at ``batch_size`` rows) by :func:`compare_latency` (``rounds`` interleaved rounds of
    ``warmup`` + ``repeats`` calls, ``threads`` torch threads; the faster median wins). With
    ``only_if_faster=False`` nothing is timed. The result depends on the machine and the thread
    count; measure with those you will deploy with. The default is many short rounds because a
    burst of load on a shared machine slows a whole round and the median over rounds ignores a
    few such rounds: for LeNet-300-100's 300→100 layer at 95 % (7.4 vs 8.4 µs), 3 rounds of 50
    calls chose wrongly in 4 of 8 runs on the loaded development machine, 15 rounds of 10 in none.

    Linear layers whose parent reads their weight tensor itself (``nn.TransformerEncoderLayer``
    and ``DecoderLayer``, whose fused fast path takes ``linear1.weight`` etc.; the ``out_proj`` of
    ``nn.MultiheadAttention``) stay dense, with that reason in the report. The sparse copy is run
    on the example and compared with the model before it is returned.

    The copy computes the same outputs up to float rounding (the sums run in another order) and
    is for inference (see :class:`SparseLinear`); the given model is not modified. Forward hooks
    registered on a replaced Linear do not move to its replacement.

    Args:
        model: any ``nn.Module``.
        input_shape: ONE input without the batch dimension, e.g. ``(1, 28, 28)``; or
        example_inputs: the inputs of one call as the model takes them, a tensor, a tuple of
            positional inputs or a dict of keyword inputs (e.g. ``input_ids``/``attention_mask``).
            Exactly one of the two.
        min_sparsity: a float in [0, 1]; 1 replaces only all-zero layers.
        only_if_faster: a bool: replace only the layers measured faster.
        batch_size: rows per timed call, an int ≥ 1 (latency at batch 1 and throughput at batch
            64 have different winners).
        threads: torch threads for the timing (an int ≥ 1), default torch's current setting.
        rounds, repeats: ints ≥ 1; warmup: an int ≥ 0.

    Returns:
        ``(sparse_model, report)``; the :class:`SparsifyReport` lists every plain Linear layer.

    Raises:
        ValueError: a value out of range, a forward pass that fails on the example, or a sparse
            copy whose output differs from the model's (a parent module that reads a replaced
            layer's weight; the message names the replaced layers).
        TypeError: an argument of the wrong type, or a layer to replace whose weights are not
            float32/float64.
    """
    where = "sparsify"
    from prunelab._model_checks import check_materialised

    check_materialised(model, where)
    batch = _example(model, input_shape, example_inputs, where)
    min_sparsity, batch_size = float(min_sparsity), int(batch_size)
    threads = None if threads is None else int(threads)
    rounds, repeats, warmup = int(rounds), int(repeats), int(warmup)

    linears = [
        (name, module, 1.0 - count_nonzero(module.weight) / module.weight.numel())
        for name, module in model.named_modules()
        if _is_plain_linear(module) and module.weight.numel()
    ]
    read_by_parent = _parent_reads_weight(model)
    for name, module, sparsity in linears:
        if sparsity >= min_sparsity and name not in read_by_parent:
            check_dtype(module.weight.dtype, f"sparsify (layer {name or '(root)'!r})")
    inputs = _linear_inputs(model, batch, where) if only_if_faster else {}

    new_model = copy.deepcopy(model)
    decisions = []
    for name, module, sparsity in linears:
        dense_ms = sparse_ms = None
        sparse = SparseLinear.from_linear(module) if sparsity >= min_sparsity and name not in read_by_parent else None
        if name in read_by_parent:
            replaced = False
            reason = f"kept dense: its parent {read_by_parent[name]} reads the weight directly"
        elif sparse is None:
            replaced = False
            reason = f"sparsity {100 * sparsity:.2f} % < min_sparsity {100 * min_sparsity:g} %"
        elif not only_if_faster:
            replaced, reason = True, f"sparsity >= {100 * min_sparsity:g} % (not timed)"
        else:
            layer_shape = inputs.get(module, (module.in_features,))
            ms = compare_latency(
                {"dense": module, "sparse": sparse},
                layer_shape,
                batch_size,
                threads=threads,
                rounds=rounds,
                repeats=repeats,
                warmup=warmup,
            )
            dense_ms, sparse_ms = ms["dense"][batch_size], ms["sparse"][batch_size]
            replaced = sparse_ms < dense_ms
            reason = "sparse faster" if replaced else "sparse not faster"
            if sparse_ms > 0:
                reason += f" ({dense_ms / sparse_ms:.2f}x)"
            if module not in inputs:
                reason += f"; not called in the dry run, timed on ({module.in_features},)"
        if replaced:
            assert sparse is not None  # replaced only when a sparse copy was made
            sparse.train(module.training)
            new_model = _replace(new_model, name, sparse)
        decisions.append(
            LayerDecision(
                name=name,
                in_features=module.in_features,
                out_features=module.out_features,
                sparsity=sparsity,
                dense_ms=dense_ms,
                sparse_ms=sparse_ms,
                replaced=replaced,
                reason=reason,
            )
        )
    report = SparsifyReport(
        layers=tuple(decisions),
        min_sparsity=min_sparsity,
        only_if_faster=only_if_faster,
        batch_size=batch_size,
        threads=threads or torch.get_num_threads(),
    )
    if report.replaced:
        _check_same_output(model, new_model, batch, report.replaced, where)
    return new_model, report


def _check_same_output(model: nn.Module, sparse: nn.Module, batch: Batch, replaced: list[str], where: str) -> None:
    """The sparse copy must give the model's output on the example (up to float rounding). A
    model that does not run on the example (``only_if_faster=False`` needs no forward pass,
    e.g. a container of layers) is not checked."""
    try:
        dense_out = logits_of(_run(model, batch, where), where=where)
    except ValueError:
        return
    try:
        sparse_out = logits_of(_run(sparse, batch, where), where=where)
    except ValueError as err:
        raise ValueError(
            f"{where}: the model fails once {', '.join(replaced)} became SparseLinear (a module "
            f"that reads their weight tensor directly?): {err}"
        ) from None
    diff = float((sparse_out - dense_out).abs().max()) if dense_out.numel() else 0.0
    scale = float(dense_out.abs().max()) if dense_out.numel() else 0.0
    if not diff <= 1e-4 * max(1.0, scale):
        raise ValueError(
            f"{where}: with {', '.join(replaced)} as SparseLinear the output differs from the "
            f"model's by {diff:.3g}; a module reads their weight tensor directly. "
            f"Raise min_sparsity to keep them dense."
        )


@dataclass(frozen=True)
class InferenceLatency:
    """Median forward latency of one model run three ways, from :func:`inference_latency`.

    * ``median_ms[variant][batch]`` for the variants ``"dense"`` (the model as it is: zeros
      stored and multiplied), ``"sparse"`` (:func:`sparsify` without timing: every Linear at
      ``min_sparsity`` or more as a :class:`SparseLinear`) and ``"thinned"`` (the units whose
      incoming weights are all zero removed, ``prunelab.units.thin_dead_units``;
      absent when the model cannot be thinned, see ``thinned_note``).
    * ``max_abs_diff[variant]``: largest output difference from the dense model on a random batch.
    * ``sparse_report``: the per-layer decisions; ``thinned_units``: ``{layer: (before, after)}``.
    """

    median_ms: dict[str, dict[int, float]]
    max_abs_diff: dict[str, float]
    sparse_report: SparsifyReport
    thinned_units: dict[str, tuple[int, int]]
    thinned_note: str
    threads: int
    rounds: int
    repeats: int

    def speedup(self, variant: str, batch_size: int) -> float:
        """``dense ms / variant ms`` at ``batch_size``."""
        return self.median_ms["dense"][batch_size] / self.median_ms[variant][batch_size]

    def to_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "max_abs_diff": self.max_abs_diff,
            "sparse": self.sparse_report.to_dict(),
            "thinned_units": {k: list(v) for k, v in self.thinned_units.items()},
            "thinned_note": self.thinned_note,
            "threads": self.threads,
            "rounds": self.rounds,
            "repeats": self.repeats,
        }

    def __str__(self) -> str:
        labels = {"dense": "dense (zeros kept)", "sparse": "sparse (CSR Linear)", "thinned": "thinned (dead units)"}
        batches = list(self.median_ms["dense"])
        rows = [["model", *(f"batch {b}" for b in batches), "max |diff|"]]
        for variant, label in labels.items():
            if variant in self.median_ms:
                rows.append(
                    [
                        label,
                        *(f"{self.median_ms[variant][b]:.4f} ms {self.speedup(variant, b):5.2f}x" for b in batches),
                        f"{self.max_abs_diff[variant]:.1e}",
                    ]
                )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        table = [
            "  "
            + "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
            for row in rows
        ]
        return "\n".join([self._header(), *table, self._sparse_line(), self._thinned_line()])

    def _header(self) -> str:
        return (
            f"latency: median over {self.rounds} interleaved round(s) of {self.repeats} calls, "
            f"{self.threads} thread(s); speedup vs dense"
        )

    def _sparse_line(self) -> str:
        def listed(decisions: list[LayerDecision]) -> str:
            return ", ".join(f"{d.name} ({100 * d.sparsity:.2f} %)" for d in decisions)

        replaced = [d for d in self.sparse_report.layers if d.replaced]
        kept = [d for d in self.sparse_report.layers if not d.replaced]
        if replaced:
            line = f"  sparse: SparseLinear for {listed(replaced)}"
        else:
            line = (
                f"  sparse: no Linear layer at >= {100 * self.sparse_report.min_sparsity:g} % sparsity (same as dense)"
            )
        return line + (f"; kept dense: {listed(kept)}" if kept else "")

    def _thinned_line(self) -> str:
        parts = []
        if self.thinned_units:
            parts.append(
                ", ".join(f"{name} {before}->{after}" for name, (before, after) in self.thinned_units.items())
                + " units"
            )
        if self.thinned_note:
            parts.append(self.thinned_note)
        return "  thinned: " + "; ".join(parts)


@validate_params({**_EXAMPLE, "min_sparsity": [FRACTION], "batch_sizes": [Sizes(MAX_BATCH)], **_ROUNDS})
def inference_latency(
    model: nn.Module,
    input_shape: Sequence[int] | int | None = None,
    *,
    example_inputs=None,
    min_sparsity: float = 0.9,
    batch_sizes: Sequence[int] | int = (1, 64),
    threads: int | None = None,
    rounds: int = 15,
    repeats: int = 10,
    warmup: int = 3,
) -> InferenceLatency:
    """Median forward latency of ``model`` as it is, sparsified and thinned (``prunelab summary --latency``).

    The three variants (see :class:`InferenceLatency`) are measured by :func:`compare_latency`
    in interleaved rounds. The model is not modified. A model that ``prunelab.units`` cannot
    analyse (e.g. an activation with ``f(0) ≠ 0``) has no thinned variant; the note says why.
    """
    from prunelab import units

    where = "inference_latency"
    batch = _example(model, input_shape, example_inputs, where)
    threads = None if threads is None else int(threads)
    rounds, repeats = int(rounds), int(repeats)

    sparse, report = sparsify(
        model, input_shape, example_inputs=example_inputs, min_sparsity=min_sparsity, only_if_faster=False
    )
    variants = {"dense": model, "sparse": sparse}
    thinned_units: dict[str, tuple[int, int]] = {}
    single = len(batch.args) == 1 and not batch.kwargs and batch.args[0].is_floating_point() and batch.args[0].dim() > 1
    # one float tensor: traced on a zero input of its shape, as before; other inputs as they are
    inputs = {"input_shape": tuple(batch.args[0].shape[1:])} if single else {"example_inputs": batch.inputs}
    try:
        found = {layer.name: layer.n_units for layer in units.Units.of(model, **inputs).layers}
        variants["thinned"], plan = units.thin_dead_units(model, **inputs)
        thinned_units = {name: (n, n - len(plan.get(name, ()))) for name, n in found.items()}
        note = "" if plan else "no unit has all-zero incoming weights (same as dense)"
    except ValueError as err:
        note = f"not thinned: {err}"

    if input_shape is None:
        probe = batch.repeat_to(8)
    else:
        x = batch.args[0]
        probe = Batch(
            (
                torch.randn((8, *x.shape[1:]), generator=torch.Generator().manual_seed(0)).to(
                    device=x.device, dtype=x.dtype
                ),
            )
        )
    outputs = {name: logits_of(_run(variant, probe, where), where=where) for name, variant in variants.items()}
    diffs = {name: float((out - outputs["dense"]).abs().max()) if out.numel() else 0.0 for name, out in outputs.items()}
    if input_shape is None:
        median_ms = compare_latency(
            variants,
            None,
            batch_sizes,
            example_inputs=example_inputs,
            threads=threads,
            rounds=rounds,
            repeats=repeats,
            warmup=warmup,
        )
    else:
        median_ms = compare_latency(
            variants, input_shape, batch_sizes, threads=threads, rounds=rounds, repeats=repeats, warmup=warmup
        )
    return InferenceLatency(
        median_ms=median_ms,
        max_abs_diff=diffs,
        sparse_report=report,
        thinned_units=thinned_units,
        thinned_note=note,
        threads=threads or torch.get_num_threads(),
        rounds=rounds,
        repeats=repeats,
    )
