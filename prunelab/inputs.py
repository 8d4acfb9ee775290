"""Batches and outputs as the model takes them.

Everywhere prunelab runs a user's model — calibration for every data-driven criterion, unit
scoring, ``summary``, ``measure_latency``, ``sparsify``, ``export_onnx`` — it goes through this
module, so that a model is fed the way it expects and its output is read the way it is meant:

**Inputs.** A model's inputs are a tensor (``model(x)``), a tuple or list (positional
arguments, ``model(*inputs)``) or a dict (keyword arguments, ``model(**inputs)``, e.g.
``input_ids``/``attention_mask`` or ``pixel_values``).

**Batches.** A batch is either inputs alone, or a pair ``(inputs, targets)``. The rules, in
order: a ``dict`` is keyword inputs, and its ``"labels"`` entry (if any) is taken out as the
targets in Hugging Face's convention (for token logits: the labels are the input tokens, and the
loss predicts token ``t+1`` at position ``t``); a tuple/list of two whose first element is a
tensor, tuple, list or dict and whose second is a tensor or None is ``(inputs, targets)`` —
prunelab's ``(x, y)`` convention; a tensor is one positional input with no targets; any other
tuple/list is positional inputs with no targets. (To pass exactly two positional tensors
without targets, write ``((a, b), None)``.)

**Data.** :func:`iter_batches` takes an ``(x, y)`` tuple of tensors (sliced into batches; a *list*
of two tensors is two batches, as ``fit`` reads it too), a dict
of equally long tensors (sliced too), or any iterable of batches — a list, a generator, a
``torch.utils.data.DataLoader``.

**Outputs.** :func:`logits_of` reads the logits from a tensor, the first element of a tuple, or
the ``"logits"`` entry (or a key the user names) of a dict or a Hugging Face ``ModelOutput``.

**Loss.** :func:`default_loss` infers the loss from shapes: classification logits ``(N, C)``
with integer targets ``(N,)``; token logits ``(N, T, V)`` with integer targets ``(N, T)``
aligned with the positions, with Hugging Face ``labels`` (shifted by one), or with no targets at
all — then the next token of the batch's ``input_ids`` (or its one integer input) is the target.
Targets equal to ``ignore_index`` (-100) do not count. A user's ``loss_fn(output, targets)``
replaces it; for a batch without targets it receives the batch's inputs as ``targets``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from prunelab._hooks import eval_mode
from prunelab._validation import check_input_shape, check_number

IGNORE_INDEX = -100
LABEL_KEYS = ("labels",)
#: Inputs larger than this in one example are refused before a dry run builds them.
MAX_EXAMPLE_ELEMENTS = 2**31


@dataclass
class Batch:
    """One batch: the model's positional ``args`` and keyword ``kwargs``, and its ``targets``
    (None when the batch carries none). ``hf_labels``: the targets came from a ``labels`` entry
    (Hugging Face convention: token labels are shifted by the loss)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    targets: torch.Tensor | None = None
    hf_labels: bool = False

    def call(self, model: nn.Module):
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """Every input tensor, positional first, then keyword in key order."""
        return [t for t in _flatten((self.args, self.kwargs)) if torch.is_tensor(t)]

    @property
    def size(self) -> int:
        """The batch size: the first dimension of the first input tensor (1 for none or a scalar)."""
        for t in self.tensors():
            return int(t.shape[0]) if t.dim() > 0 else 1
        return 1

    @property
    def inputs(self):
        """The inputs as the user gave them: a tensor, a tuple of args, or a dict of kwargs."""
        if self.kwargs and not self.args:
            return dict(self.kwargs)
        if len(self.args) == 1 and not self.kwargs:
            return self.args[0]
        return self.args

    def to(self, device=None, dtype=None) -> Batch:
        """A copy with floating-point inputs cast to ``dtype`` and every tensor moved to ``device``
        (integer inputs such as token ids keep their dtype)."""

        def move(t):
            if not torch.is_tensor(t):
                return t
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device) if device is not None else t

        targets = self.targets.to(device) if (self.targets is not None and device is not None) else self.targets
        return Batch(_map(move, self.args), _map(move, self.kwargs), targets, self.hf_labels)

    def repeat_to(self, batch_size: int) -> Batch:
        """A batch of ``batch_size`` made of this batch's first example repeated (for latency
        measurements at several batch sizes from one example). Tensors whose first dimension is
        not this batch's size are passed as they are."""
        n = self.size

        def rep(t):
            if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == n:
                return t[:1].expand(batch_size, *t.shape[1:]).contiguous()
            return t

        return Batch(_map(rep, self.args), _map(rep, self.kwargs), None, self.hf_labels)

    def slice(self, start: int, stop: int) -> Batch:
        n = self.size

        def cut(t):
            return t[start:stop] if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == n else t

        targets = self.targets[start:stop] if self.targets is not None else None
        return Batch(_map(cut, self.args), _map(cut, self.kwargs), targets, self.hf_labels)


def _map(fn, value):
    if isinstance(value, dict):
        return {k: _map(fn, v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_map(fn, v) for v in value) if isinstance(value, tuple) else [_map(fn, v) for v in value]
    return fn(value)


def _flatten(value) -> Iterator:
    if isinstance(value, Mapping):
        for key in value:
            yield from _flatten(value[key])
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _flatten(v)
    else:
        yield value


def _is_inputs(value) -> bool:
    return torch.is_tensor(value) or isinstance(value, (tuple, list, Mapping))


def inputs_batch(inputs, *, where: str, param: str = "example_inputs") -> Batch:
    """A :class:`Batch` of inputs only (no targets): a tensor, a tuple/list of positional
    arguments, or a dict of keyword arguments."""
    if torch.is_tensor(inputs):
        return Batch((inputs,))
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(
                f"the '{param}' parameter of {where} must have string keys (the model's "
                f"keyword arguments). Got the key {bad[0]!r} instead."
            )
        return Batch((), dict(inputs))
    if isinstance(inputs, (tuple, list)):
        if not inputs:
            raise ValueError(
                f"the '{param}' parameter of {where} is empty; give a tensor, a tuple of "
                f"positional inputs or a dict of keyword inputs."
            )
        return Batch(tuple(inputs))
    raise TypeError(
        f"the '{param}' parameter of {where} must be a tensor, a tuple/list of positional "
        f"inputs or a dict of keyword inputs. Got {type(inputs).__name__} instead."
    )


def as_batch(batch, *, where: str, index: int | None = None) -> Batch:
    """Read one batch by the rules of the module docstring."""
    if isinstance(batch, Batch):
        return batch
    label = f"batch {index}" if index is not None else "the batch"
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        targets = None
        hf = False
        for key in LABEL_KEYS:
            if key in kwargs:
                targets = kwargs.pop(key)
                hf = True
        if not kwargs:
            raise ValueError(f"{where}: {label} is a dict with no model inputs (keys: {', '.join(map(str, batch))}).")
        out = inputs_batch(kwargs, where=where, param="data")
        out.targets, out.hf_labels = targets, hf
        return out
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and _is_inputs(batch[0])
        and (batch[1] is None or torch.is_tensor(batch[1]))
    ):
        out = inputs_batch(batch[0], where=where, param="data")
        out.targets = batch[1]
        return out
    if torch.is_tensor(batch) or isinstance(batch, (tuple, list)):
        return inputs_batch(batch, where=where, param="data")
    raise TypeError(
        f"{where}: {label} of the data is a {type(batch).__name__}; a batch must be a tensor, a "
        f"tuple/list (positional inputs, or an (inputs, targets) pair) or a dict of keyword inputs."
    )


def _is_pair(data) -> bool:
    """A whole data set given as an ``(x, y)`` tuple (a *list* of two tensors is two batches)."""
    return isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data)


def _is_tensor_dict(data) -> bool:
    return isinstance(data, Mapping) and bool(data) and all(torch.is_tensor(v) for v in data.values())


def iter_batches(data, batch_size: int, *, where: str, check_values: bool = True) -> Iterator[Batch]:
    """Yield :class:`Batch` es from ``data``: an ``(x, y)`` pair of tensors or a dict of equally
    long tensors (both sliced into ``batch_size`` pieces), or an iterable of batches (a list, a
    generator, a ``DataLoader``). Refuses empty data, mismatched lengths and NaN/inf inputs."""
    batch_size = check_number("batch_size", batch_size, where=where, low=1, integer=True)
    if _is_pair(data) or _is_tensor_dict(data):
        whole = as_batch(data, where=where)
        tensors = whole.tensors() + ([whole.targets] if whole.targets is not None else [])
        n = whole.size
        if n == 0 or any(t.dim() == 0 for t in tensors):
            raise ValueError(f"the 'data' parameter of {where} is an empty calibration set (0 samples).")
        lengths = sorted({len(t) for t in tensors})
        if len(lengths) > 1:
            raise ValueError(
                f"the 'data' parameter of {where}: inputs and targets differ in length "
                f"({' vs '.join(str(k) for k in lengths)})."
            )
        if check_values:
            _check_batch(whole, where, None)
        for i in range(0, n, batch_size):
            yield whole.slice(i, i + batch_size)
        return
    if torch.is_tensor(data):
        raise TypeError(
            f"the 'data' parameter of {where} is a single tensor; pass an (inputs, targets) pair, "
            f"or an iterable of batches."
        )
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"the 'data' parameter of {where} must be an (x, y) pair of tensors, a dict of tensors "
            f"or an iterable of batches (a list, a DataLoader). Got {type(data).__name__} instead."
        )
    n = 0
    for raw in data:
        batch = as_batch(raw, where=where, index=n)
        if check_values:
            _check_batch(batch, where, n)
        n += 1
        yield batch
    if n == 0:
        raise ValueError(f"the 'data' parameter of {where} is an empty calibration set (no batches).")


def _check_batch(batch: Batch, where: str, index: int | None) -> None:
    from prunelab._model_checks import check_values

    label = f" of batch {index}" if index is not None else ""
    for t in batch.tensors():
        if t.is_floating_point() or t.is_meta:
            check_values(f"the calibration inputs{label} ('data') of {where}", t)
    if batch.targets is not None and (batch.targets.is_floating_point() or batch.targets.is_meta):
        check_values(f"the calibration targets{label} ('data') of {where}", batch.targets)


# ----------------------------------------------------------------------------- outputs
def logits_of(output, key: str | None = None, *, where: str = "prunelab") -> torch.Tensor:
    """The logits of a model's ``output``: the tensor itself, the first element of a tuple, or the
    ``key`` (default ``"logits"``) entry of a dict / Hugging Face ``ModelOutput``."""
    if torch.is_tensor(output):
        if key is not None:
            raise ValueError(f"{where}: output_key={key!r} was given, but the model returns a plain tensor.")
        return output
    if isinstance(output, Mapping) or hasattr(output, "keys"):
        keys = list(output.keys())
        wanted = key or "logits"
        if wanted not in keys:
            raise ValueError(
                f"{where}: the model's output ({type(output).__name__}) has no {wanted!r} entry; "
                f"its entries are {', '.join(map(str, keys))}. Name the one to use with output_key=."
            )
        value = output[wanted]
        if not torch.is_tensor(value):
            raise ValueError(f"{where}: the model output's {wanted!r} entry is a {type(value).__name__}, not a tensor.")
        return value
    if isinstance(output, (tuple, list)) and output:
        if key is not None:
            raise ValueError(f"{where}: output_key={key!r} was given, but the model returns a {type(output).__name__}.")
        if not torch.is_tensor(output[0]):
            raise ValueError(
                f"{where}: the model returns a {type(output).__name__} whose first element is a "
                f"{type(output[0]).__name__}, not the logits tensor."
            )
        return output[0]
    raise ValueError(
        f"{where}: cannot find logits in the model's output of type {type(output).__name__}; "
        f"pass loss_fn= (and output_key= for a dict output)."
    )


def token_ids(batch: Batch) -> torch.Tensor | None:
    """The batch's token ids: ``input_ids`` or its only integer input tensor (None if unclear)."""
    if torch.is_tensor(batch.kwargs.get("input_ids")):
        return batch.kwargs["input_ids"]
    ints = [t for t in batch.tensors() if not t.is_floating_point() and not t.is_complex() and t.dim() >= 2]
    return ints[0] if len(ints) == 1 else None


def _check_class_targets(targets: torch.Tensor, n_classes: int, where: str) -> None:
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"{where}: classification targets must be integer class indices; got dtype "
            f"{targets.dtype}. Pass loss_fn= for another kind of target."
        )
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n_classes):
        raise ValueError(
            f"{where}: targets must be class indices in [0, {n_classes}) (or {IGNORE_INDEX}, "
            f"ignored); got values from {int(valid.min())} to {int(valid.max())}."
        )


def loss_targets(logits: torch.Tensor, batch: Batch, *, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(M, C)`` and integer targets ``(M,)`` for a cross-entropy, inferred from shapes as
    the module docstring says (positions predicting nothing are dropped or set to ignore_index)."""
    targets = batch.targets
    if logits.dim() == 2:
        if targets is None:
            raise ValueError(
                f"{where}: the model returns class logits {tuple(logits.shape)} but the batch has "
                f"no targets; give (inputs, targets) batches, or loss_fn=."
            )
        if targets.shape != logits.shape[:1]:
            raise ValueError(
                f"{where}: class logits {tuple(logits.shape)} need targets of shape "
                f"({logits.shape[0]},); got {tuple(targets.shape)}."
            )
        _check_class_targets(targets, logits.shape[1], where)
        return logits, targets
    if logits.dim() == 3:
        n, t, v = logits.shape
        if targets is None or batch.hf_labels:
            ids = targets if targets is not None else token_ids(batch)
            if ids is None:
                raise ValueError(
                    f"{where}: the model returns token logits {tuple(logits.shape)} but the batch has "
                    f"neither targets nor one integer input (input_ids) to predict; give "
                    f"(inputs, targets) batches, or loss_fn=."
                )
            if ids.shape != (n, t):
                raise ValueError(
                    f"{where}: token logits {tuple(logits.shape)} need token ids of shape ({n}, {t}); "
                    f"got {tuple(ids.shape)}."
                )
            _check_class_targets(ids, v, where)
            return logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1)  # position t predicts token t+1
        if targets.shape != (n, t):
            raise ValueError(
                f"{where}: token logits {tuple(logits.shape)} need targets of shape ({n}, {t}); "
                f"got {tuple(targets.shape)}."
            )
        _check_class_targets(targets, v, where)
        return logits.reshape(-1, v), targets.reshape(-1)
    raise ValueError(
        f"{where}: cannot infer a loss for logits of shape {tuple(logits.shape)} (expected "
        f"(N, classes) or (N, tokens, vocabulary)); pass loss_fn=."
    )


def default_loss(logits: torch.Tensor, batch: Batch, *, where: str) -> torch.Tensor:
    """Mean cross-entropy over the counted targets (see :func:`loss_targets`)."""
    flat_logits, flat_targets = loss_targets(logits, batch, where=where)
    return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class Loss:
    """``loss(output, batch) -> scalar``: the user's ``loss_fn(output, targets)`` (``targets`` being
    the batch's inputs when it has none), or — when ``user`` is None or a plain mean cross-entropy —
    the shape-inferred cross-entropy of the output's logits (``output_key`` names a dict entry)."""

    user: Callable | None = None
    output_key: str | None = None
    where: str = "prunelab"

    @property
    def is_cross_entropy(self) -> bool:
        return is_cross_entropy(self.user)

    def logits(self, output) -> torch.Tensor:
        return logits_of(output, self.output_key, where=self.where)

    def __call__(self, output, batch: Batch) -> torch.Tensor:
        if self.user is None or (
            _is_plain_cross_entropy(self.user)
            and (
                self.output_key is not None or not torch.is_tensor(output) or output.dim() != 2 or batch.targets is None
            )
        ):
            return default_loss(self.logits(output), batch, where=self.where)
        targets = batch.targets if batch.targets is not None else batch.inputs
        return self.user(output, targets)


def make_loss(loss_fn: Callable | Loss | None, output_key: str | None = None, *, where: str) -> Loss:
    """A :class:`Loss` from a user's ``loss_fn`` (or None for the shape-inferred cross-entropy)."""
    if isinstance(loss_fn, Loss):
        return loss_fn
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"the 'loss_fn' parameter of {where} must be callable (output, targets) -> loss. "
            f"Got {type(loss_fn).__name__} instead."
        )
    if output_key is not None and not isinstance(output_key, str):
        raise TypeError(
            f"the 'output_key' parameter of {where} must be a string (an entry of the model's "
            f"dict output). Got {type(output_key).__name__} instead."
        )
    return Loss(loss_fn, output_key, where)


def _is_plain_cross_entropy(loss_fn) -> bool:
    if loss_fn is F.cross_entropy:
        return True
    return (
        type(loss_fn) is nn.CrossEntropyLoss
        and loss_fn.reduction == "mean"
        and loss_fn.weight is None
        and loss_fn.ignore_index == IGNORE_INDEX
        and loss_fn.label_smoothing == 0.0
    )


def is_cross_entropy(loss_fn) -> bool:
    """Whether ``loss_fn`` is the default (shape-inferred) or a plain mean cross-entropy."""
    return loss_fn is None or _is_plain_cross_entropy(loss_fn)


def forward_batches(model: nn.Module, batches: Iterable, *, where: str = "prunelab"):
    """Run ``model`` on each batch (a :class:`Batch`, or anything :func:`as_batch` reads) in eval
    mode without autograd, restoring every module's ``training`` flag afterwards. Returns the last
    output."""
    out = None
    with eval_mode(model), torch.no_grad():
        for i, batch in enumerate(batches):
            out = as_batch(batch, where=where, index=i).call(model)
    return out


def example_batch(
    model: nn.Module,
    input_shape=None,
    example_inputs=None,
    *,
    where: str,
    dtype: torch.dtype | None = None,
    device=None,
) -> Batch:
    """The one example that a dry run feeds: ``example_inputs`` (tensor, tuple or dict) as given,
    or a zero tensor of shape ``(1, *input_shape)`` in the model's dtype. Exactly one of the two."""
    if (input_shape is None) == (example_inputs is None):
        raise ValueError(
            f"{where} needs exactly one of 'input_shape' (one input without the batch dimension) "
            f"and 'example_inputs' (a tensor, tuple or dict the model takes). Got "
            f"{'both' if input_shape is not None else 'neither'}."
        )
    if example_inputs is not None:
        batch = inputs_batch(example_inputs, where=where)
        total = sum(t.numel() for t in batch.tensors())
        if total > MAX_EXAMPLE_ELEMENTS:
            raise ValueError(
                f"the 'example_inputs' parameter of {where} holds {total} elements, over the limit "
                f"of {MAX_EXAMPLE_ELEMENTS}."
            )
        return batch.to(device=device)
    shape = check_input_shape(input_shape, where)
    return Batch((torch.zeros((1, *shape), device=device, dtype=dtype or torch.float32),))
