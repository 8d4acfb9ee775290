"""Exact FLOPs of a model's forward pass, dense and with zero weights skipped (docs/methods.md §6).

**How they are counted.** One dry forward pass runs under a ``TorchDispatchMode`` that sees
every aten operation the model executes, whatever called it: an ``nn.Linear``, a functional
``torch.matmul`` inside a Hugging Face attention, ``scaled_dot_product_attention``, an
``nn.MultiheadAttention`` that applies its projections functionally. Each arithmetic
operation below is counted and attributed to a module: to the module that owns a parameter
operand (matched by the memory it reads, so ``W.t()`` or a q/k/v block of a packed
``in_proj_weight`` is recognised; among tied owners the one being run), otherwise to the
innermost module being run (the attention products go to the attention module's row).
Recurrent, hashed and sparse layers are counted by a module formula instead (below).

**Convention** (the pruning literature's): a multiply–accumulate (MAC) costs 2 FLOPs, a bias
one add per output element; elementwise operations are free.

* Matrix products ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``addbmm``, ``mv``, ``addmv``, ``dot``:
  ``2·MACs``, plus ``out.numel()`` adds for the added operand (``addmm``'s bias). This covers
  Linear (``2·numel(W)·P + numel(b)·P`` at ``P`` positions), Hugging Face ``Conv1D``
  (``addmm`` with the ``(in, out)`` weight), ``nn.MultiheadAttention``'s projections and
  every matmul a model calls functionally.
* Convolutions (grouped, depthwise and transposed too): ``2·P·numel(W)`` with ``P`` the output
  positions (the input positions for a transposed convolution; ``numel(W) = out·(in/groups)·k…``
  already counts each output's taps), plus ``out.numel()`` adds for the bias.
* Attention (``scaled_dot_product_attention``'s fused kernels): the ``QKᵀ`` and ``AV`` products,
  ``2·B·H_q·S_q·S_k·(d_k + d_v)`` (grouped-query attention: per query head; a causal mask is
  not discounted). Attention computed with matmuls is counted by the matmul rule, to the
  same number.
* Recurrent modules (``nn.RNN/LSTM/GRU`` and their cells), per sample and time step:
  ``2·numel(W) + numel(b)`` summed over the module's weights and biases (every layer and
  direction sees every step); the gate nonlinearities and elementwise products are free.
* Embedding lookups are gathers: 0 FLOPs (their rows show 0, not "not counted").
* Not counted: activations, softmax, normalisation, pooling, residual adds, masks, scaling.
  A fused operation with real arithmetic but no rule here (``torch.addr``, ``embedding_bag``,
  ``nn.Bilinear``'s ``_trilinear``) raises a ``RuntimeWarning`` naming it and its module.

**Zeros.** A zero entry of a parameter operand costs nothing: for a product ``A·B`` the
remaining MACs are ``Σ_k nnz(A[:, k])·nnz(B[k, :])``, an activation operand counting as dense
— so a Linear keeps ``2·nnz(W)·P + nnz(b)·P``; a convolution ``2·P·nnz(W)``; a recurrent
module ``2·nnz(W) + nnz(b)`` per step. Hashed layers count their virtual weights and
``prunelab.models.sparse.SparseLinear`` counts as the Linear it was made from (module formulas).

``torch.utils.flop_counter.FlopCounterMode`` counts the same products without the bias adds
(``docs/metrics.md`` shows the check on every model of the test zoo).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._python_dispatch import TorchDispatchMode

# dry_forward, resolve_input and check_input_shape are not used here: importable from here still
from prunelab._validation import validate_params
from prunelab.metrics.dry_run import (  # noqa: F401
    DRY_PARAMS,
    DTYPE,
    DryInput,
    InstrumentError,
    check_input_shape,
    dry_failure,
    dry_forward,
    resolve_dry_input,
    resolve_input,
    run_dry,
)

#: Module types whose FLOPs were counted before any dispatch counting (kept for callers).
COUNTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Module types whose rows always carry FLOPs (0 when never called).
_COUNTED_KINDS = (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase, nn.Embedding)

aten = torch.ops.aten


class FlopCountError(InstrumentError):
    """prunelab could not count an operation (a bug to report, not a problem of the model)."""


@dataclass(frozen=True)
class FlopCount:
    """Dense and remaining (zero weights skipped) FLOPs of one layer, per sample."""

    dense: int
    remaining: int

    @property
    def speedup(self) -> float | None:
        """``dense / remaining``; see :func:`ratio`."""
        return ratio(self.dense, self.remaining)


def ratio(numerator: int, denominator: int) -> float | None:
    """``numerator / denominator``, ``inf`` when only the denominator is 0, ``None`` when both are."""
    if denominator == 0:
        return math.inf if numerator > 0 else None
    return numerator / denominator


def count_nonzero(tensor: torch.Tensor) -> int:
    """Number of entries that are not exactly zero (any dtype, any device)."""
    return int(torch.count_nonzero(tensor.detach()).item())


def flop_types() -> tuple[type, ...]:
    """The types counted by a module formula instead of by their operations: the hashed layers
    (their virtual weights do the work), ``prunelab.models.sparse.SparseLinear`` (counted as the
    Linear it was), and the recurrent modules (per time step, whatever kernel runs them)."""
    from prunelab.models.hashed import HashedLayer
    from prunelab.models.sparse import SparseLinear

    return (HashedLayer, SparseLinear, nn.RNNBase, nn.RNNCellBase)


def counted_kinds(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose rows carry FLOPs even when never called (then 0): Linear,
    Conv, HF Conv1D, MultiheadAttention, RNNs, Embedding, hashed and sparse layers."""
    from prunelab.pruning.targets import is_hf_conv1d

    kinds = (*_COUNTED_KINDS, *flop_types())
    return [module for module in model.modules() if isinstance(module, kinds) or is_hf_conv1d(module)]


# ----------------------------------------------------------------------------- module formulas
def layer_flops(module: nn.Module, output_shapes: Sequence[torch.Size]) -> FlopCount:
    """FLOPs of a Linear/Conv (or hashed, or sparse) ``module`` over calls that produced
    ``output_shapes`` (batch 1). A hashed layer counts its virtual weights, a virtual weight being
    zero when its bucket is; a SparseLinear counts as the Linear it was made from."""
    from prunelab.models.hashed import HashedLayer
    from prunelab.models.sparse import SparseLinear

    if not isinstance(module, (*COUNTED_TYPES, HashedLayer, SparseLinear)):
        raise TypeError(
            f"layer_flops counts Linear and Conv1d/2d/3d layers (and hashed and sparse "
            f"layers) only; got {type(module).__name__}"
        )
    weight, bias = module.weight, cast("torch.Tensor | None", module.bias)  # a parameter, or SparseLinear's buffer
    if hasattr(module, "virtual_weight"):  # a hashed layer
        with torch.no_grad():
            weight = cast(HashedLayer, module).virtual_weight()
    elif hasattr(module, "dense_weight"):  # SparseLinear: its CSR weight at its dense shape
        weight = cast(SparseLinear, module).dense_weight()
    n_out = weight.shape[0]  # out_features or out_channels
    positions = sum(math.prod(shape) // n_out for shape in output_shapes)
    dense = 2 * weight.numel() * positions
    remaining = 2 * count_nonzero(weight) * positions
    if bias is not None:
        dense += bias.numel() * positions
        remaining += count_nonzero(bias) * positions
    return FlopCount(dense=dense, remaining=remaining)


def recurrent_flops(module: nn.Module, x) -> FlopCount:
    """FLOPs of one call of an ``nn.RNN/LSTM/GRU`` (or a cell) on input ``x``: for each
    (sample, time step) pair, ``2·numel(W) + numel(b)`` over all its weights and biases."""
    if isinstance(x, PackedSequence):
        steps = int(x.data.shape[0])  # Σ over samples of their lengths
    else:
        steps = x.numel() // module.input_size  # (T, B, I), (B, T, I), (T, I), (B, I), (I,)
    dense = remaining = 0
    for name, param in module.named_parameters(recurse=False):
        per_entry = 2 if name.startswith("weight") else 1
        dense += per_entry * param.numel() * steps
        remaining += per_entry * count_nonzero(param) * steps
    return FlopCount(dense, remaining)


def _formula_flops(module: nn.Module, inputs: tuple, output) -> FlopCount:
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return recurrent_flops(module, inputs[0])
    return layer_flops(module, [output.shape])


# ----------------------------------------------------------------------------- operation rules
def _nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    return (t.to_dense() if t.layout != torch.strided else t) != 0


def _product(a: torch.Tensor, b: torch.Tensor, a_weight: bool, b_weight: bool) -> tuple[int, int]:
    """Dense and remaining FLOPs of ``a @ b`` with ``a (..., M, K)`` and ``b (..., K, N)`` (same
    batch dimensions): a zero entry of a weight operand removes its MACs, ``Σ_k nnz(a[:, k])·
    nnz(b[k, :])`` per batch entry; an activation operand counts as dense."""
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    dense = 2 * math.prod(a.shape[:-2]) * m * k * n
    if not (a_weight or b_weight):
        return dense, dense
    if not a_weight:
        return dense, 2 * m * int(_nonzero_mask(b).sum())
    if not b_weight:
        return dense, 2 * n * int(_nonzero_mask(a).sum())
    columns = _nonzero_mask(a).sum(-2).long()  # (..., K)
    rows = _nonzero_mask(b).sum(-1).long()  # (..., K)
    return dense, 2 * int((columns * rows).sum())


def _added(added, out: torch.Tensor, is_weight: bool, beta) -> tuple[int, int]:
    """One add per output element for the added operand (a bias); its zeros are free."""
    if added is None or beta == 0 or not torch.is_tensor(added) or added.numel() == 0:
        return 0, 0
    dense = out.numel()
    if not is_weight:
        return dense, dense
    return dense, dense // added.numel() * count_nonzero(added)


def _matmul_rule(packet):
    """The rule of one matrix product: its operands ``(added, a, b)`` read from the arguments,
    vectors made matrices (``mv``: ``b (K, 1)``; ``dot``: ``a (1, K)``, ``b (K, 1)``)."""

    def operands(args):
        if packet in (aten.mm, aten.bmm, aten._int_mm):
            return None, args[0], args[1]
        if packet in (aten.addmm, aten.baddbmm, aten.addbmm, aten._addmm_activation):
            return args[0], args[1], args[2]
        if packet is aten.mv:
            return None, args[0], args[1].unsqueeze(-1)
        if packet is aten.addmv:
            return args[0], args[1], args[2].unsqueeze(-1)
        return None, args[0].unsqueeze(0), args[1].unsqueeze(-1)  # dot, vdot

    def rule(args, kwargs, out, is_weight):
        added, a, b = operands(args)  # views share their storage: is_weight sees the parameter
        dense, remaining = _product(a, b, is_weight(a), is_weight(b))
        add = _added(added, out, added is not None and is_weight(added), kwargs.get("beta", 1))
        return dense + add[0], remaining + add[1], [a, b, added]

    return rule


def _convolution_rule(args, kwargs, out, is_weight):
    x, weight, bias, transposed = args[0], args[1], args[2], bool(args[6])
    positions = (x.numel() // x.shape[1]) if transposed else (out.numel() // out.shape[1])
    dense = 2 * positions * weight.numel()
    remaining = 2 * positions * count_nonzero(weight) if is_weight(weight) else dense
    add_dense, add_remaining = _added(bias, out, bias is not None and is_weight(bias), 1)
    return dense + add_dense, remaining + add_remaining, [weight, *([bias] if bias is not None else [])]


def _attention_rule(seq_axis: int):
    """QKᵀ and AV of a fused attention kernel; ``seq_axis`` is the key's sequence axis
    (-2 for ``(B, H, S, d)``, 1 for the ``(B, S, H, d)`` layout of the low-level kernels)."""

    def rule(args, kwargs, out, is_weight):
        q, k, v = args[0], args[1], args[2]
        dense = 2 * (q.numel() // q.shape[-1]) * k.shape[seq_axis] * (q.shape[-1] + v.shape[-1])
        return dense, dense, []

    return rule


def _gather_rule(args, kwargs, out, is_weight):
    return 0, 0, [args[0]]


def _ops(*names: str) -> list:
    return [getattr(aten, name) for name in names if hasattr(aten, name)]


def _rules() -> dict:
    rules = {
        packet: _matmul_rule(packet)
        for packet in _ops(
            "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_addmm_activation", "_int_mm"
        )
    }
    rules.update({packet: _convolution_rule for packet in _ops("convolution", "_convolution")})
    rules.update(
        {
            packet: _attention_rule(-2)
            for packet in _ops(
                "_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_cudnn_attention",
                "_scaled_dot_product_fused_attention_overrideable",
            )
        }
    )
    rules.update(
        {packet: _attention_rule(1) for packet in _ops("_flash_attention_forward", "_efficient_attention_forward")}
    )
    rules[aten.embedding] = _gather_rule
    return rules


_RULES = _rules()
#: Fused operations that do counted work but whose FLOPs are not counted: seen outside a
#: module formula, they raise a warning (the dry run turns the attention fast paths off).
_UNCOUNTED = set(
    _ops(
        "_transformer_encoder_layer_fwd",
        "_native_multi_head_attention",
        "mkldnn_rnn_layer",
        "_cudnn_rnn",
        "_thnn_fused_lstm_cell",
        "_thnn_fused_gru_cell",
        "embedding_bag",
        "_embedding_bag",
        "_embedding_bag_forward_only",
        "_sparse_mm",
        "addr",
        "_trilinear",
        "conv_tbc",
    )
)


# ----------------------------------------------------------------------------- the counting mode
def _memory_span(t: torch.Tensor):
    """``(storage key, first element, last element)`` of the memory ``t`` reads (None for
    tensors without a plain storage: sparse, nested, meta)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if not ptr or t.numel() == 0:
        return None
    first = t.storage_offset()
    last = first + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return (t.device, ptr, t.element_size()), first, last


class _FlopMode(TorchDispatchMode):
    """Counts the operations of :data:`_RULES` per module while a module-hook stack says which
    modules are running; inside a module counted by formula (:func:`flop_types`) nothing is."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.spans: dict = {}  # storage → [(first, last, owning module)] of every parameter
        for module in model.modules():
            for param in module.parameters(recurse=False):
                span = _memory_span(param)
                if span is not None:
                    self.spans.setdefault(span[0], []).append((span[1], span[2], module))
        self.stack: list[nn.Module] = []
        self.formula_depth = 0
        self.counts: dict[nn.Module, list[int]] = {}
        self.uncounted: dict[str, set[str]] = {}
        self.names = {module: name or "(root)" for name, module in model.named_modules()}

    @property
    def running(self) -> nn.Module:
        return self.stack[-1] if self.stack else self.model

    def owners(self, t) -> list[nn.Module]:
        """The modules owning a parameter that ``t`` is (a view of): its memory lies inside the
        parameter's (a slice of a flat buffer of many parameters matches only its own)."""
        span = _memory_span(t) if torch.is_tensor(t) else None
        if span is None:
            return []
        key, first, last = span
        return [module for low, high, module in self.spans.get(key, ()) if low <= first and last <= high]

    def is_weight(self, t) -> bool:
        return bool(self.owners(t))

    def add(self, module: nn.Module, dense: int, remaining: int) -> None:
        count = self.counts.setdefault(module, [0, 0])
        count[0] += dense
        count[1] += remaining

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.formula_depth:
            return out
        packet = func.overloadpacket
        rule = _RULES.get(packet)
        if rule is None:
            if packet in _UNCOUNTED:
                self.uncounted.setdefault(str(packet), set()).add(self.names.get(self.running, "?"))
            return out
        result = out[0] if isinstance(out, (tuple, list)) else out
        try:
            dense, remaining, operands = rule(args, kwargs, result, self.is_weight)
        except Exception as err:
            raise FlopCountError(
                f"prunelab could not count the FLOPs of {func} in module "
                f"{self.names.get(self.running, '?')!r}: {type(err).__name__}: {err}"
            ) from err
        self.add(self._attribute(operands), dense, remaining)
        return out

    def _attribute(self, operands: list) -> nn.Module:
        """The owner of the first parameter operand (the running one among tied owners), else
        the innermost running module."""
        for t in operands:
            owners = self.owners(t)
            if owners:
                running = [m for m in reversed(self.stack) if m in owners]
                return running[0] if running else owners[0]
        return self.running

    def hooks(self, model: nn.Module) -> list:
        """Forward hooks that keep the module stack and count the formula modules (the
        outermost one, its operations not counted)."""
        formula = flop_types()
        pending: dict[nn.Module, list] = {}

        def enter(module, args):
            self.stack.append(module)
            if isinstance(module, formula):
                self.formula_depth += 1
                pending.setdefault(module, []).append(args)

        def leave(module, args, output):
            if self.stack and self.stack[-1] is module:
                self.stack.pop()
            if isinstance(module, formula):
                inputs = pending[module].pop()
                if output is not None and self.formula_depth == 1:  # its own operations stay uncounted
                    count = _formula_flops(module, inputs, output)
                    self.add(module, count.dense, count.remaining)
                self.formula_depth -= 1

        handles = []
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        return handles


@contextlib.contextmanager
def attention_fast_paths_off():
    """``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` fast paths run one fused kernel;
    turned off, they run the same arithmetic as separate counted operations."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def module_flops(model: nn.Module, batch, *, where: str, failure: str) -> dict[nn.Module, FlopCount]:
    """Dense and remaining FLOPs of one forward of ``model`` on ``batch`` (a
    :class:`prunelab.inputs.Batch`), per module: every module of a counted kind (Linear, Conv,
    HF Conv1D, MultiheadAttention, RNN, Embedding, hashed, sparse; 0 if never called) and
    every other module that ran a counted operation. ``failure`` describes the input in the
    error raised when the forward fails."""
    mode = _FlopMode(model)
    handles = mode.hooks(model)
    with attention_fast_paths_off():
        run_dry(model, batch, where, handles, failure=failure, mode=mode)
    if mode.uncounted:
        listed = "; ".join(f"{op} in {', '.join(sorted(names))}" for op, names in mode.uncounted.items())
        warnings.warn(
            f"{where}: the FLOPs of these fused operations are not counted: {listed}.", RuntimeWarning, stacklevel=3
        )
    counts = {module: FlopCount(0, 0) for module in counted_kinds(model)}
    counts.update({module: FlopCount(*count) for module, count in mode.counts.items()})
    return counts


def per_sample_flops(model: nn.Module, dry: DryInput, where: str) -> dict[nn.Module, FlopCount]:
    """:func:`module_flops` on one sample: the dry input's first example."""
    return module_flops(model, dry.batch.repeat_to(1), where=where, failure=dry_failure(dry))


@validate_params({**DRY_PARAMS, "dtype": DTYPE})
def count_flops(
    model: nn.Module,
    input_shape: Sequence[int] | int | None = None,
    *,
    example_inputs=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, FlopCount]:
    """Dense and remaining FLOPs per sample, by module name (see the module docstring).

    Give ``input_shape`` (one input without the batch dimension, e.g. ``(1, 28, 28)``; a zero
    tensor of batch 1 is run) or ``example_inputs`` (a tensor, a tuple of positional inputs or
    a dict of keyword inputs such as ``input_ids``/``attention_mask``; its first sample is run).
    ``device`` and ``dtype`` default to those of the model's parameters (integer inputs keep
    their dtype). Every Linear, Conv, HF Conv1D, MultiheadAttention, RNN and Embedding gets an
    entry, and every other module that ran a counted operation (e.g. an attention module's
    ``QKᵀ`` and ``AV``).
    """
    dry = resolve_dry_input(model, input_shape, example_inputs, device, dtype, "count_flops")
    counts = per_sample_flops(model, dry, "count_flops")
    return {name: counts[module] for name, module in model.named_modules() if module in counts}
