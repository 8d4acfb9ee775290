"""The one dry forward pass that ``summary``, ``count_flops``, ``measure_latency`` and ``sparsify``
run: which input it feeds and how a failure is reported.

The input is a zero tensor ``(1, *input_shape)`` in the model's dtype, or ``example_inputs`` as
the model takes them (a tensor, a tuple of positional inputs, a dict of keyword inputs; see
``prunelab.inputs``), floating-point tensors cast to the model's dtype, integer ones (token ids)
kept. The forward runs without gradients, in eval mode; every module's ``training`` flag comes
back and the caller's hooks are removed afterwards, also when it fails, and a failure becomes a
``ValueError`` that names the input and carries the model's error.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab._validation import MODEL, SHAPE, Constraint, Types, check_input_shape, check_type

if TYPE_CHECKING:
    from prunelab.inputs import Batch


class InstrumentError(RuntimeError):
    """An error of prunelab's own instrumentation during a dry run (not the model's): passed on
    as it is, not reported as a failure of the model."""


#: What every dry-run function declares (summary, count_flops, measure_latency, sparsify, ...).
DRY_PARAMS: dict[str, list[Constraint | None]] = {
    "model": [MODEL],
    "input_shape": [SHAPE, None],
    "device": [Types(str, torch.device), None],
}
DTYPE = [Types(torch.dtype), None]


def default_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the model's first parameter or buffer and the dtype of its first float parameter."""
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return device, floats[0] if floats else torch.get_default_dtype()


def _resolve_device_dtype(
    model: nn.Module, device: object, dtype: object, where: str
) -> tuple[torch.device, torch.dtype]:
    check_type("model", model, nn.Module, where=where)
    default_device, default_dtype = default_device_dtype(model)
    if device is None:
        device = default_device
    else:
        check_type("device", device, (str, torch.device), where=where)
        try:
            device = torch.device(cast("str | torch.device", device))
        except RuntimeError as err:
            raise ValueError(
                f"the 'device' parameter of {where} must be a torch device. Got {device!r} instead."
            ) from err
    if dtype is None:
        dtype = default_dtype
    check_type("dtype", dtype, torch.dtype, where=where)
    return device, cast(torch.dtype, dtype)


def resolve_input(
    model: nn.Module, input_shape: object, device: object, dtype: object, where: str
) -> tuple[tuple[int, ...], torch.device, torch.dtype]:
    """Validate the dry-run input's shape, device and dtype, filling defaults from the model."""
    check_type("model", model, nn.Module, where=where)
    shape = check_input_shape(input_shape, where)
    device, dtype = _resolve_device_dtype(model, device, dtype, where)
    return shape, device, dtype


@dataclass(frozen=True)
class DryInput:
    """What a dry run feeds: ``batch`` (a :class:`prunelab.inputs.Batch`), the per-sample
    ``shape`` for reports (a tuple for one tensor, a list for positional inputs, a dict for
    keyword inputs), ``device``, ``dtype``, and whether it came from ``example_inputs``."""

    batch: Batch
    shape: tuple[int, ...] | list | dict
    device: torch.device
    dtype: torch.dtype
    from_example: bool

    def describe(self, batch_size: int) -> str:
        """The input for an error message, at ``batch_size``."""
        if not self.from_example:
            return (
                f"an input of shape {(batch_size, *self.shape)} (input_shape={self.shape} plus a batch "
                f"of {batch_size}, dtype={self.dtype}, device={self.device})"
            )
        return f"example_inputs {self.shape} (per sample, repeated to a batch of {batch_size}, device={self.device})"

    def hint(self) -> str:
        if self.from_example:
            return "check the 'example_inputs' parameter (a tensor, tuple or dict the model takes)"
        return "check the 'input_shape' parameter (one input, without the batch dimension) and the dtype"


def sample_shapes(batch: Batch) -> tuple[int, ...] | list | dict:
    """Per-sample shapes of a batch's inputs (batch dimension dropped), in the inputs' structure."""

    def one(t):
        return tuple(t.shape[1:]) if torch.is_tensor(t) else type(t).__name__

    inputs = batch.inputs
    if torch.is_tensor(inputs):
        return one(inputs)
    if isinstance(inputs, dict):
        return {key: one(value) for key, value in inputs.items()}
    return [one(value) for value in inputs]


def resolve_dry_input(
    model: nn.Module, input_shape: object, example_inputs: object, device: object, dtype: object, where: str
) -> DryInput:
    """The one example of a dry run: a zero tensor ``(1, *input_shape)`` in the model's dtype, or
    ``example_inputs`` (a tensor, a tuple of positional inputs, a dict of keyword inputs) with
    floating-point tensors cast to ``dtype`` (default: the model's) and integer ones (token ids)
    kept. Exactly one of the two; the device defaults to the model's."""
    from prunelab.inputs import Batch, example_batch

    check_type("model", model, nn.Module, where=where)
    if input_shape is not None and example_inputs is not None:
        raise ValueError(
            f"{where} takes exactly one of 'input_shape' (one input without the batch "
            f"dimension) and 'example_inputs' (a tensor, tuple or dict the model takes). "
            f"Got both."
        )
    if example_inputs is None:
        if input_shape is None:
            raise ValueError(
                f"the 'input_shape' parameter of {where} must be a tuple of positive ints (one "
                f"input, without the batch dimension), or give 'example_inputs' instead. "
                f"Got None instead."
            )
        shape, device, dtype = resolve_input(model, input_shape, device, dtype, where)
        zeros = on_device(lambda: torch.zeros((1, *shape), device=device, dtype=dtype), device, where)
        return DryInput(Batch((zeros,)), shape, device, dtype, from_example=False)
    device, dtype = _resolve_device_dtype(model, device, dtype, where)
    batch = example_batch(model, None, example_inputs, where=where)
    batch = on_device(lambda: batch.to(device=device, dtype=dtype), device, where)
    return DryInput(batch, sample_shapes(batch), device, dtype, from_example=True)


def on_device(make, device: torch.device, where: str):
    """``make()``, a device this machine lacks becoming a ValueError that names 'device'."""
    try:
        return make()
    except (RuntimeError, AssertionError) as err:  # an absent CUDA raises AssertionError
        raise ValueError(
            f"the 'device' parameter of {where} must be a device this machine has. "
            f"Got {str(device)!r} instead ({type(err).__name__}: {err})."
        ) from err


def run_dry(
    model: nn.Module,
    batch,
    where: str,
    handles: list,
    *,
    failure: str,
    mode: contextlib.AbstractContextManager | None = None,
) -> None:
    """One forward of ``batch`` through ``model``, without gradients and in eval mode (under
    ``mode`` if given); every module's ``training`` flag is restored and ``handles`` (hooks) are
    removed afterwards, also when the forward fails. A failing forward becomes a ``ValueError``
    that says ``failure`` (which input, what to check) and carries the model's own error."""
    try:
        with eval_mode(model), torch.no_grad(), mode if mode is not None else contextlib.nullcontext():
            batch.call(model)
    except InstrumentError:
        raise
    except Exception as err:
        raise ValueError(
            f"{where} could not run {type(model).__name__} on {failure}. The model raised {type(err).__name__}: {err}"
        ) from err
    finally:
        for handle in handles:
            handle.remove()


def dry_failure(dry: DryInput) -> str:
    """The ``failure`` text of :func:`run_dry` for a dry run of batch 1."""
    return f"{dry.describe(1)}; {dry.hint()}"


def dry_forward(
    model: nn.Module, input_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, where: str, handles: list
) -> None:
    """One zero input of batch 1 through ``model`` (see :func:`run_dry`); a failing forward
    becomes a ``ValueError`` that names ``input_shape`` and carries the model's own error."""
    from prunelab.inputs import Batch

    dry = DryInput(
        Batch((torch.zeros((1, *input_shape), device=device, dtype=dtype),)),
        tuple(input_shape),
        device,
        dtype,
        from_example=False,
    )
    run_dry(model, dry.batch, where, handles, failure=dry_failure(dry))
