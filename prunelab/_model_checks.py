"""Checks that a model, and the batches given with it, can do what a public function asks, run
before any work starts: each answers with one ValueError naming the parameter, the layer or the
batch, what is wrong and what would work, instead of a raw torch error from deep inside a solver,
a training loop or a file writer (issue 18).

* :func:`check_materialised`: no parameter or buffer on the ``meta`` device (no values);
* :func:`check_trainable`: some parameter requires a gradient (``fit``);
* :func:`check_batch_fits`: the model runs on one example of the first batch (and the loss on
  its output), the error naming the batch's shapes and what the model's first layer takes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

from prunelab._hooks import eval_mode

#: Errors a forward pass or a loss raises for inputs that do not fit the model.
FORWARD_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError)


def check_materialised(model: nn.Module, where: str, param: str = "model") -> None:
    """Refuse a model with tensors on the meta device (built under ``torch.device("meta")``, or
    loaded without its weights): they have shapes but no values to prune, train, measure or save.
    Anything but an ``nn.Module`` passes (the caller's type check names it)."""
    if not isinstance(model, nn.Module):
        return
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = [name for name, t in tensors if t.is_meta]
    if meta:
        more = f" and {len(meta) - 1} more" if len(meta) > 1 else ""
        raise ValueError(
            f"the '{param}' parameter of {where} has tensors on the meta device ({meta[0]!r}{more}): "
            f"they have shapes but no values. Materialise the model first, e.g. "
            f"model.to_empty(device='cpu') and then load its weights."
        )


def check_trainable(model: nn.Module, where: str, param: str = "model") -> None:
    """Refuse a model none of whose parameters requires a gradient: there is nothing to train."""
    params = list(model.parameters())
    if not params:
        raise ValueError(f"the '{param}' parameter of {where} has no parameters, so there is nothing to train.")
    if not any(p.requires_grad for p in params):
        raise ValueError(
            f"the '{param}' parameter of {where} has no parameter with requires_grad=True "
            f"(all {len(params)} are frozen), so there is nothing to train; unfreeze the ones "
            f"to train, e.g. model.requires_grad_(True)."
        )


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def expected_input(model: nn.Module) -> str:
    """What the model's first layer with parameters takes, as a phrase for an error message."""
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is None:
            continue
        dtype = str(floating_dtype(model)).removeprefix("torch.")
        if isinstance(module, nn.Linear):
            return (
                f"; its first layer {name!r} (Linear) takes {dtype} inputs whose last dimension is {module.in_features}"
            )
        if isinstance(module, nn.modules.conv._ConvNd):
            return (
                f"; its first layer {name!r} ({type(module).__name__}) takes {dtype} inputs of "
                f"{module.in_channels} channels (batch, channels, ...)"
            )
        if isinstance(module, nn.Embedding):
            return f"; its first layer {name!r} (Embedding) takes integer token ids in [0, {module.num_embeddings})"
        return f"; its first layer with parameters is {name!r} ({type(module).__name__}), in {dtype}"
    return ""


def describe(batch) -> str:
    """The shapes and dtypes of a :class:`~prunelab.inputs.Batch`'s input tensors."""

    def one(t):
        return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"

    parts = [one(t) for t in batch.args if torch.is_tensor(t)]
    parts += [f"{k} {one(t)}" for k, t in batch.kwargs.items() if torch.is_tensor(t)]
    return ", ".join(parts) or "no tensors"


def check_batch_fits(model: nn.Module, batch, what: str, loss: Callable | None = None) -> None:
    """Run ``model`` (eval mode, no autograd, every module's mode restored) on the first example of
    ``batch`` and ``loss(output, example)`` on its output, so that batches the model cannot take
    fail now, as one ValueError naming them (``what``, e.g. "the batches of the 'data' parameter of
    fit") and what the model takes, not as a torch error mid-way through the work."""
    sample = batch.slice(0, 1) if batch.size > 1 else batch
    try:
        with eval_mode(model), torch.no_grad():
            output = sample.call(model)
    except FORWARD_ERRORS as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{what} ({describe(batch)}) do not fit the model: {type(err).__name__}: {first}{expected_input(model)}."
        ) from err
    if loss is None:
        return
    try:
        with torch.no_grad():
            value = loss(output, sample)
        if not (torch.is_tensor(value) and value.dim() == 0):
            got = f"Tensor{tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"loss_fn must return a scalar tensor; it returned {got}.")
    except ValueError as err:
        raise ValueError(f"{what} do not fit the model's output: {err}") from err
    except (RuntimeError, TypeError, IndexError) as err:
        raise ValueError(
            f"the loss fails on the first of {what} ({describe(batch)}): {type(err).__name__}: {err}"
        ) from err


def check_values(what: str, tensor, *, hint: str = ""):
    """:func:`~prunelab._validation.check_finite` for data: first refuse a tensor on the meta
    device (shapes without values, which no finiteness check or model can read)."""
    from prunelab._validation import check_finite

    if torch.is_tensor(tensor) and tensor.is_meta:
        raise ValueError(
            f"{what} is a tensor on the meta device (a shape {tuple(tensor.shape)} without values); "
            f"give real data, e.g. on 'cpu'."
        )
    return check_finite(what, tensor, hint=hint)
