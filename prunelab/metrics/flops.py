"""Theoretical FLOPs of Linear and Conv layers, dense and with zero weights skipped (METHODS.md §6).

Convention (the pruning literature's): only ``nn.Linear`` and
``nn.Conv1d/2d/3d`` are counted, per sample, from the calls a dry forward
pass actually makes. A weight tensor ``W`` applied at ``P`` output positions
costs one multiply and one add per entry and position, and a bias one add
per output element:

    dense     = 2·numel(W)·P + numel(b)·P
    remaining = 2·nnz(W)·P   + nnz(b)·P

``P`` is the number of output positions of one sample: ``output.numel() /
out_features`` for Linear (the product of the input's leading non-batch
dimensions, 1 for a 2-D input) and ``output.numel() / out_channels`` for a
convolution (``H_out·W_out`` for Conv2d). Groups need no special case:
``numel(W) = out·(in / groups)·k…`` already counts each output's taps. A
module called several times is counted once per call; one that is never
called costs 0. Activations, pooling, normalisation, attention and
recurrent layers are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunelab._validation import check_type

#: Module types whose FLOPs are counted (and whose ``weight`` is prunable by default).
COUNTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    """The types whose FLOPs are counted: COUNTED_TYPES, the hashed layers (their virtual
    weights do the work) and ``prunelab.sparse.SparseLinear`` (counted as the Linear it was)."""
    from prunelab.models.hashed import HashedLayer
    from prunelab.sparse import SparseLinear

    return (*COUNTED_TYPES, HashedLayer, SparseLinear)


def layer_flops(module: nn.Module, output_shapes: Sequence[torch.Size]) -> FlopCount:
    """FLOPs of a Linear/Conv (or hashed, or sparse) ``module`` over calls that produced
    ``output_shapes`` (batch 1). A hashed layer counts its virtual weights, a virtual weight being
    zero when its bucket is; a SparseLinear counts as the Linear it was made from."""
    if not isinstance(module, flop_types()):
        raise TypeError(f"layer_flops counts Linear and Conv1d/2d/3d layers (and hashed and sparse "
                        f"layers) only; got {type(module).__name__}")
    weight, bias = module.weight, module.bias
    if hasattr(module, "virtual_weight"):
        with torch.no_grad():
            weight = module.virtual_weight()
    elif hasattr(module, "dense_weight"):  # SparseLinear: its CSR weight at its dense shape
        weight = module.dense_weight()
    n_out = weight.shape[0]  # out_features or out_channels
    positions = sum(math.prod(shape) // n_out for shape in output_shapes)
    dense = 2 * weight.numel() * positions
    remaining = 2 * count_nonzero(weight) * positions
    if bias is not None:
        dense += bias.numel() * positions
        remaining += count_nonzero(bias) * positions
    return FlopCount(dense=dense, remaining=remaining)


def check_input_shape(input_shape: object, where: str) -> tuple[int, ...]:
    """One input's shape without the batch dimension: a sequence of positive ints (or one int)."""
    if isinstance(input_shape, int) and not isinstance(input_shape, bool):
        input_shape = (input_shape,)
    expected = "a tuple of positive ints (one input, without the batch dimension)"
    valid = (isinstance(input_shape, (tuple, list, torch.Size))
             and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape))
    if not valid:
        raise ValueError(f"the 'input_shape' parameter of {where} must be {expected}. "
                         f"Got {input_shape!r} instead.")
    return tuple(input_shape)


def _default_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the model's first parameter or buffer and the dtype of its first float parameter."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return device, floats[0] if floats else torch.get_default_dtype()


def resolve_input(model: nn.Module, input_shape: object, device: object, dtype: object,
                  where: str) -> tuple[tuple[int, ...], torch.device, torch.dtype]:
    """Validate the dry-run input's shape, device and dtype, filling defaults from the model."""
    check_type("model", model, nn.Module, where=where)
    shape = check_input_shape(input_shape, where)
    default_device, default_dtype = _default_device_dtype(model)
    if device is None:
        device = default_device
    else:
        check_type("device", device, (str, torch.device), where=where)
        try:
            device = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"the 'device' parameter of {where} must be a torch device. "
                             f"Got {device!r} instead.") from err
    if dtype is None:
        dtype = default_dtype
    check_type("dtype", dtype, torch.dtype, where=where)
    return shape, device, dtype


def dry_forward(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
                where: str, handles: list) -> None:
    """One zero input of batch 1 through ``model``, without gradients and in eval mode; every
    module's ``training`` flag is restored and ``handles`` (hooks) are removed afterwards, also
    when the forward fails. A failing forward becomes a ``ValueError`` that names
    ``input_shape`` and carries the model's own error."""
    modes = [(module, module.training) for module in model.modules()]
    example = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    except Exception as err:
        raise ValueError(
            f"{where} could not run {type(model).__name__} on an input of shape "
            f"{tuple(example.shape)} (input_shape={input_shape} plus a batch of 1, "
            f"dtype={dtype}, device={device}); check the 'input_shape' parameter "
            f"(one input, without the batch dimension) and the dtype. "
            f"The model raised {type(err).__name__}: {err}") from err
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def trace_outputs(model: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype, where: str) -> dict[nn.Module, list[torch.Size]]:
    """Run one zero input of batch 1 through ``model`` and record the output shapes of counted layers.

    The forward runs without gradients and in eval mode; every module's
    ``training`` flag is restored afterwards and the hooks are removed, also
    when the forward fails. A failing forward becomes a ``ValueError`` that
    names ``input_shape`` and carries the model's own error.
    """
    calls: dict[nn.Module, list[torch.Size]] = {}

    def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        calls.setdefault(module, []).append(output.shape)

    handles = [module.register_forward_hook(record)
               for module in model.modules() if isinstance(module, flop_types())]
    dry_forward(model, input_shape, device, dtype, where, handles)
    return calls


def count_flops(model: nn.Module, input_shape: Sequence[int] | int, *,
                device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> dict[str, FlopCount]:
    """Dense and remaining FLOPs per sample of every Linear/Conv layer, by module name.

    ``input_shape`` is one input without the batch dimension, e.g. ``(1, 28, 28)``.
    ``device`` and ``dtype`` of the dry-run input default to those of the
    model's parameters. See the module docstring for the formulas.
    """
    shape, device, dtype = resolve_input(model, input_shape, device, dtype, "count_flops")
    calls = trace_outputs(model, shape, device, dtype, "count_flops")
    return {name: layer_flops(module, calls.get(module, []))
            for name, module in model.named_modules() if isinstance(module, flop_types())}
