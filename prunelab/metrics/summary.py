"""Per-layer and total metrics of a (pruned) model: sparsity, compression, FLOPs, storage.

Pruning in prunelab zeroes weights in place, so everything here is read from
the tensors: an entry counts as pruned exactly when it equals 0. The
definitions follow docs/methods.md §6–8 and are spelled out in ``docs/metrics.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from torch import nn

from prunelab._validation import suggest, validate_params
from prunelab.metrics.dry_run import DRY_PARAMS, DTYPE, resolve_dry_input
from prunelab.metrics.flops import FlopCount, count_nonzero, per_sample_flops, ratio
from prunelab.metrics.storage import BITS, INDEX_BITS_OR_AUTO, StorageTally, check_storage_bits
from prunelab.pruning.granularity import nm_pattern
from prunelab.pruning.targets import layout_of


@dataclass(frozen=True)
class LayerStats:
    """Metrics of one module's own parameters (or of the whole model, for the total row).

    * ``params``: entries of its parameters; ``nonzero``: those not exactly 0.
    * ``prunable`` / ``prunable_nonzero``: the same over its prunable weights.
    * ``sparsity = 1 − prunable_nonzero / prunable`` (``None`` without prunable weights).
    * ``compression = params / nonzero`` (``inf`` if all are zero, ``None`` if ``params = 0``).
    * ``flops_dense`` / ``flops``: FLOPs per sample, dense and with zeros skipped, of the
      operations attributed to the module (``None`` for a module none is attributed to that is
      not a Linear, Conv, HF Conv1D, MultiheadAttention, RNN or Embedding: normalisation,
      activations, custom elementwise modules).
    * ``speedup = flops_dense / flops`` (``inf`` if ``flops = 0 < flops_dense``, else ``None`` when undefined).
    * ``bytes_dense`` / ``bytes_bitmask`` / ``bytes_csr``: storage in each format, summed over tensors.
    * ``best_format``: every tensor's cheapest format if they agree, ``"mixed"`` otherwise;
      ``bytes_best`` sums each tensor's cheapest size (``"nm"``: the N:M format of
      docs/methods.md §7, for weights that hold an N:M pattern).
    * ``pattern``: the N:M pattern (``"2:4"``) every prunable weight of the module holds
      (:func:`prunelab.pruning.granularity.nm_pattern`: runs of M consecutive inputs of a row,
      M in 2, 4, 8, most runs full), ``"mixed"`` if they hold different ones, ``None`` if none does.
    * ``bytes_csr_no_fill``: Zhu & Gupta's count ``nnz·(b + r)`` summed over tensors, CSR without
      filler entries (docs/methods.md §7): an accounting to compare with, not a format, so never
      the ``best_format`` and not a column of the printed tables (it is in :meth:`Summary.to_dict`).
    """

    name: str
    type: str
    params: int
    nonzero: int
    prunable: int
    prunable_nonzero: int
    sparsity: float | None
    compression: float | None
    flops_dense: int | None
    flops: int | None
    speedup: float | None
    bytes_dense: int
    bytes_bitmask: int
    bytes_csr: int
    best_format: str | None
    bytes_best: int
    pattern: str | None = None
    bytes_csr_no_fill: int = 0


@dataclass
class _Tally:
    """Counts gathered over tensors and layers, turned into a :class:`LayerStats` at the end."""

    storage: StorageTally
    params: int = 0
    nonzero: int = 0
    prunable: int = 0
    prunable_nonzero: int = 0
    flops: FlopCount | None = None
    patterns: list = field(default_factory=list)  # per prunable tensor: "N:M" or None

    def add_tensor(self, tensor: torch.Tensor, is_prunable: bool, layout: str = "other") -> None:
        n, nnz = tensor.numel(), count_nonzero(tensor)
        self.params += n
        self.nonzero += nnz
        nm = None
        if is_prunable:
            self.prunable += n
            self.prunable_nonzero += nnz
            nm = nm_pattern(tensor, layout)
            self.patterns.append(None if nm is None else f"{nm[0]}:{nm[1]}")
        self.storage.add(tensor, nm)

    def add_flops(self, flops: FlopCount | None) -> None:
        if flops is None:
            return
        if self.flops is None:
            self.flops = flops
        else:
            self.flops = FlopCount(self.flops.dense + flops.dense, self.flops.remaining + flops.remaining)

    def merge(self, other: _Tally) -> None:
        self.params += other.params
        self.nonzero += other.nonzero
        self.prunable += other.prunable
        self.prunable_nonzero += other.prunable_nonzero
        self.add_flops(other.flops)
        self.storage.merge(other.storage)
        self.patterns += other.patterns

    def pattern(self) -> str | None:
        found = set(self.patterns)
        if not found or found == {None}:
            return None
        return next(iter(found)) if len(found) == 1 else "mixed"

    def freeze(self, name: str, type_name: str) -> LayerStats:
        sparsity = None if self.prunable == 0 else 1.0 - self.prunable_nonzero / self.prunable
        flops = self.flops
        return LayerStats(
            name=name,
            type=type_name,
            params=self.params,
            nonzero=self.nonzero,
            prunable=self.prunable,
            prunable_nonzero=self.prunable_nonzero,
            sparsity=sparsity,
            compression=ratio(self.params, self.nonzero),
            flops_dense=None if flops is None else flops.dense,
            flops=None if flops is None else flops.remaining,
            speedup=None if flops is None else flops.speedup,
            bytes_dense=self.storage.bytes["dense"],
            bytes_bitmask=self.storage.bytes["bitmask"],
            bytes_csr=self.storage.bytes["csr"],
            best_format=self.storage.best_format,
            bytes_best=self.storage.best,
            pattern=self.pattern(),
            bytes_csr_no_fill=self.storage.no_fill,
        )


# (header, attribute, right-aligned) of the printed tables.
_COLUMNS = (
    ("layer", "name", False),
    ("type", "type", False),
    ("params", "params", True),
    ("nonzero", "nonzero", True),
    ("sparsity %", "sparsity", True),
    ("compression x", "compression", True),
    ("FLOPs dense", "flops_dense", True),
    ("FLOPs", "flops", True),
    ("speedup x", "speedup", True),
    ("bytes dense", "bytes_dense", True),
    ("bytes bitmask", "bytes_bitmask", True),
    ("bytes CSR", "bytes_csr", True),
    ("best", "best_format", False),
)
#: Shown only when some layer holds an N:M pattern (tables of other models stay as they were).
_PATTERN_COLUMN = ("N:M", "pattern", False)


def _index_words(index_bits: int | str) -> str:
    if index_bits == "auto":
        return "CSR relative indices of each tensor's best width"
    return f"{index_bits}-bit CSR relative indices"


def _cell(attribute: str, value: object) -> str:
    if value is None:
        return "-"
    if attribute == "name":
        return cast(str, value) or "(root)"
    if attribute == "sparsity":
        return f"{100 * cast(float, value):.2f}"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _json_value(value: object) -> object:
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def _json_shape(shape: object) -> object:
    """Per-sample shapes as JSON: a list of ints, a list of those, or a dict of those."""
    if isinstance(shape, tuple):
        return list(shape)
    if isinstance(shape, dict):
        return {key: _json_shape(value) for key, value in shape.items()}
    if isinstance(shape, list):
        return [_json_shape(value) for value in shape]
    return shape


@dataclass(frozen=True, repr=False)
class Summary:
    """The result of :func:`summary`: one :class:`LayerStats` per module with parameters, and a total.

    ``print(result)`` shows a fixed-width table, :meth:`to_markdown` the same
    as Markdown, :meth:`to_dict` a JSON-serialisable record.
    """

    rows: tuple[LayerStats, ...]
    total: LayerStats
    input_shape: tuple[int, ...] | list | dict
    bits: int
    index_bits: int | str

    @property
    def effective_compression(self) -> float | None:
        """``total.bytes_dense / total.bytes_best``: storage saved by the cheapest format per tensor."""
        return ratio(self.total.bytes_dense, self.total.bytes_best)

    def to_dict(self) -> dict:
        """A JSON-serialisable record; ``inf`` becomes the string ``"inf"``, undefined values ``None``."""

        def row_dict(row: LayerStats) -> dict:
            return {key: _json_value(value) for key, value in asdict(row).items()}

        return {
            "input_shape": _json_shape(self.input_shape),
            "bits": self.bits,
            "index_bits": self.index_bits,
            "effective_compression": _json_value(self.effective_compression),
            "rows": [row_dict(row) for row in self.rows],
            "total": row_dict(self.total),
        }

    def _columns(self) -> tuple:
        if any(row.pattern is not None for row in self.rows):
            return (*_COLUMNS, _PATTERN_COLUMN)
        return _COLUMNS

    def _table(self) -> list[list[str]]:
        return [
            [_cell(attribute, getattr(row, attribute)) for _, attribute, _ in self._columns()]
            for row in (*self.rows, self.total)
        ]

    def _footer(self) -> str:
        effective = _cell("effective_compression", self.effective_compression)
        inputs = "input_shape" if isinstance(self.input_shape, tuple) else "inputs"
        return (
            f"per sample of {inputs} {self.input_shape}; {self.bits}-bit values, "
            f"{_index_words(self.index_bits)}; effective storage compression "
            f"{effective}x; FLOPs of products, convolutions, attention, recurrent steps and bias adds"
        )

    def to_markdown(self) -> str:
        """The table as GitHub-flavoured Markdown, total row in bold."""
        table = self._table()
        table[-1] = [f"**{cell}**" if cell else "" for cell in table[-1]]
        columns = self._columns()
        lines = [
            "| " + " | ".join(header for header, _, _ in columns) + " |",
            "|" + "|".join("---:" if right else ":---" for _, _, right in columns) + "|",
        ]
        lines += ["| " + " | ".join(cells) + " |" for cells in table]
        return "\n".join(lines) + f"\n\n{self._footer()}\n"

    def __str__(self) -> str:
        table = self._table()
        columns = self._columns()
        headers = [header for header, _, _ in columns]
        widths = [max(len(cells[i]) for cells in [headers, *table]) for i in range(len(headers))]

        def line(cells: Sequence[str]) -> str:
            padded = [
                cell.rjust(width) if right else cell.ljust(width)
                for cell, width, (_, _, right) in zip(cells, widths, columns)
            ]
            return "  ".join(padded).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        body = [line(cells) for cells in table[:-1]]
        return "\n".join([line(headers), rule, *body, rule, line(table[-1]), self._footer()])

    def __repr__(self) -> str:
        total = self.total
        sparsity = _cell("sparsity", total.sparsity)
        return (
            f"Summary(rows={len(self.rows)}, params={total.params:,}, nonzero={total.nonzero:,}, "
            f"sparsity={sparsity}%, compression={_cell('compression', total.compression)}x, "
            f"speedup={_cell('speedup', total.speedup)}x)"
        )


def _counted_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(name, identity, tensor)`` of each tensor that counts as the module's own parameter.

    A ``prunelab.models.sparse.SparseLinear`` keeps its weight and bias as buffers; they count as the
    parameters of the Linear it was made from, the weight at its dense shape (its CSR ``values``
    array stands for it in identity checks)."""
    from prunelab.models.sparse import SparseLinear

    if isinstance(module, SparseLinear):
        own = [("weight", module.values, module.dense_weight())]
        if module.bias is not None:
            own.append(("bias", module.bias, module.bias))
        return own
    return [(name, param, param) for name, param in module.named_parameters(recurse=False)]


def _default_prunable(model: nn.Module) -> set[int]:
    """Identities of the weights prunelab prunes by default (``prunelab.pruning.targets``: every
    Linear-like weight — Linear, Conv, HF Conv1D, MultiheadAttention's q/k/v, RNN weights — tied
    tensors once, an output layer tied to an embedding left out) and of SparseLinear weights."""
    from prunelab.models.sparse import SparseLinear
    from prunelab.pruning.targets import TiedWeightSkipped, resolve_targets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TiedWeightSkipped)
        try:
            ids = {id(target.weight) for target in resolve_targets(model, None, where="summary")}
        except ValueError:  # no Linear-like layer at all
            ids = set()
    return ids | {id(module.values) for module in model.modules() if isinstance(module, SparseLinear)}


def _prunable_ids(model: nn.Module, prunable: Iterable[str] | str | None, where: str) -> set[int]:
    """Identities of the prunable parameters: by default those of :func:`_default_prunable`."""
    from prunelab.models.sparse import SparseLinear

    if prunable is None:
        return _default_prunable(model)
    if isinstance(prunable, str):
        prunable = [prunable]
    if not isinstance(prunable, Iterable):
        raise TypeError(
            f"the 'prunable' parameter of {where} must be None or an iterable of "
            f"parameter names. Got {prunable!r} of type {type(prunable).__name__} instead."
        )
    names = list(prunable)
    params: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    for prefix, module in model.named_modules():
        if isinstance(module, SparseLinear):
            params.update(
                {f"{prefix}.{name}" if prefix else name: identity for name, identity, _ in _counted_tensors(module)}
            )
    unknown = [name for name in names if not isinstance(name, str) or name not in params]
    if unknown:
        hint = suggest(unknown[0], params) if isinstance(unknown[0], str) else ""
        raise ValueError(
            f"the 'prunable' parameter of {where} names unknown parameters: "
            f"{', '.join(map(repr, unknown))}{hint}; valid names are: "
            f"{', '.join(params) or '(the model has no parameters)'}."
        )
    return {id(params[name]) for name in names}


def _warn_non_finite(model: nn.Module) -> None:
    bad = {}
    for name, param in model.named_parameters():
        if param.is_floating_point():
            finite = torch.isfinite(param)
            if not bool(finite.all()):
                bad[name] = param.numel() - int(finite.sum())
    if bad:
        listed = ", ".join(f"{name} ({n})" for name, n in bad.items())
        warnings.warn(
            f"summary: non-finite (NaN/inf) entries in {listed}; they count as non-zero. Did training diverge?",
            RuntimeWarning,
            stacklevel=4,
        )


@validate_params({**DRY_PARAMS, "dtype": DTYPE, "bits": BITS, "index_bits": INDEX_BITS_OR_AUTO})
def summary(
    model: nn.Module,
    input_shape: Sequence[int] | int | None = None,
    *,
    example_inputs=None,
    prunable: Iterable[str] | str | None = None,
    bits: int = 32,
    index_bits: int | str = 4,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Summary:
    """Sparsity, compression, FLOPs and storage of every module that owns parameters, plus a total.

    Args:
        model: any ``nn.Module``; it is not modified (its train/eval modes are restored).
        input_shape: shape of ONE input without the batch dimension, e.g. ``(1, 28, 28)``;
            a zero tensor of shape ``(1, *input_shape)`` is run.
        example_inputs: instead of ``input_shape``, inputs as the model takes them: a tensor,
            a tuple of positional inputs or a dict of keyword inputs (``input_ids``,
            ``attention_mask``, ``pixel_values``…), with a batch dimension first; their first
            sample is run. Floating-point tensors are cast to ``dtype``, integer ones (token
            ids) keep theirs. Exactly one of ``input_shape`` and ``example_inputs``.
        prunable: names of the parameters whose zeros count as sparsity (e.g.
            ``["fc1.weight"]``); default: the weights prunelab prunes by default (every
            Linear-like weight: Linear, Conv1d/2d/3d, HF Conv1D, MultiheadAttention's
            ``in_proj_weight``, RNN ``weight_ih/hh``; a weight tied to an embedding excluded)
            and SparseLinear weights.
        bits: bits per stored value ``b``, in ``[1, 64]``.
        index_bits: bits per CSR relative index ``r``, in ``[1, 16]``, or ``"auto"`` for
            each tensor's best width (as ``prunelab.save(..., index_bits="auto")`` stores it).
        device, dtype: of the dry-run input; default: those of the model's parameters
            (pass ``dtype=torch.long`` with ``input_shape`` for a model that starts with an
            Embedding, or give ``example_inputs``).

    The FLOPs come from one dry forward pass (no gradients, eval mode) whose operations are
    counted as ``prunelab.metrics.flops`` describes: matrix products, convolutions, attention
    products, recurrent steps and bias adds, each attributed to a module; a module that owns no
    parameter but runs counted operations (an attention module's ``QKᵀ`` and ``AV``) gets a
    row too. Rows are in ``model.named_modules()`` order. A parameter shared by several
    modules is counted in the first one only, so ``total.params`` equals
    ``sum(p.numel() for p in model.parameters())`` (plus, for a model with
    ``prunelab.models.sparse.SparseLinear`` layers, their weights and biases, counted as
    the parameters of the Linear layers they were made from). The total's sparsity is over
    prunable weights only, its compression ``total params / total non-zero`` and
    its speedup ``total dense FLOPs / total remaining FLOPs``. Buffers (e.g.
    BatchNorm running statistics) are not parameters and are not counted.

    NaN and ±inf entries are not zero, so they count as non-zero; a ``RuntimeWarning`` names
    the parameters that hold any (a diverged model is measured, not refused).

    Raises:
        ValueError: bad ``input_shape`` or ``example_inputs`` (also when the forward pass fails
            with them), both or neither given, unknown ``prunable`` names, ``bits``/``index_bits``
            out of range.
        TypeError: arguments of the wrong type.
    """
    where = "summary"
    from prunelab._model_checks import check_materialised

    check_materialised(model, where)
    dry = resolve_dry_input(model, input_shape, example_inputs, device, dtype, where)
    bits, index_bits = check_storage_bits(bits, index_bits, where)
    prunable_ids = _prunable_ids(model, prunable, where)
    _warn_non_finite(model)
    flops = per_sample_flops(model, dry, where)

    rows, total = [], _Tally(StorageTally(bits, index_bits))
    seen: set[int] = set()
    for name, module in model.named_modules():
        own = _counted_tensors(module)
        if not own and module not in flops:
            continue
        tally = _Tally(StorageTally(bits, index_bits))
        for param_name, identity, tensor in own:
            if id(identity) not in seen:
                seen.add(id(identity))
                layout = "linear" if identity is not tensor else layout_of(module, param_name)  # SparseLinear: a Linear
                tally.add_tensor(tensor, id(identity) in prunable_ids, layout)
        tally.add_flops(flops.get(module))
        rows.append(tally.freeze(name, type(module).__name__))
        total.merge(tally)
    return Summary(
        rows=tuple(rows), total=total.freeze("total", ""), input_shape=dry.shape, bits=bits, index_bits=index_bits
    )
