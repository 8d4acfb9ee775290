"""Training and evaluation: ``fit`` and ``evaluate`` over a Dataset, tensors or any batches.

Two kinds of data, one loop:

* **In memory** — a prunelab Dataset, an ``(x, y)`` tuple of tensors, or a dict of equally long
  tensors (keyword inputs, with an optional Hugging Face ``labels`` entry). A batch is an index
  slice of the tensors (no per-sample Python loop); ``fit`` shuffles with a generator seeded with
  ``seed`` and ``batch_size`` sets the batch size.
* **Batches** — any iterable of batches in the forms of :mod:`prunelab.inputs` (a tensor, a
  tuple of positional inputs, a dict of keyword inputs, an ``(inputs, targets)`` pair): a list, a
  ``torch.utils.data.DataLoader``, a function returning a fresh iterable for each pass, or a
  one-shot iterator (one pass only). The batches are used as they come.

The loss is inferred from the output's shape (:class:`prunelab.inputs.Loss`: class logits
``(N, C)`` or token logits ``(N, T, V)`` with next-token or given labels) or is the user's
``loss_fn(output, targets)``; ``output_key`` names the logits entry of a dict output.

``fit`` is deterministic for a given ``seed`` and initial model on the CPU: the shuffling stream
comes from a generator seeded with ``seed``, and dropout (and a DataLoader's own shuffling) draws
from the global RNG, which ``fit`` seeds inside a forked RNG state so the caller's random state is
left untouched.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from prunelab._hooks import eval_mode
from prunelab._model_checks import check_materialised, check_trainable, check_values
from prunelab._validation import (
    BATCH_SIZE,
    DATA,
    EPOCHS,
    EVERY,
    FRACTION,
    MODEL,
    SEED,
    STEP,
    Interval,
    Model,
    Options,
    Types,
    check_finite,
    validate_params,
)
from prunelab.distillation import Distillation, check_teacher, make_distillation
from prunelab.inputs import IGNORE_INDEX, Batch, Loss, as_batch, loss_targets, make_loss
from prunelab.pruning.pruner import Pruner
from prunelab.pruning.regularizers import Regularizer, make_regularizer
from prunelab.pruning.targets import resolve_targets

OPTIMIZERS = {
    "sgd": lambda params, lr, momentum, weight_decay: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay
    ),
    "adam": lambda params, lr, momentum, weight_decay: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay),
    "adamw": lambda params, lr, momentum, weight_decay: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
}
DATA_FORMS = (
    "an (x, y) pair of tensors (a tuple), a prunelab Dataset, a dict of tensors or an iterable of "
    "batches (a list, a DataLoader, a function returning one)"
)
BATCH_FORMS = "a tensor, a tuple/list (positional inputs, or an (inputs, targets) pair) or a dict of keyword inputs"


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


class Callback:
    """Hooks ``fit`` calls; override what you need. ``state`` is the live TrainState."""

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    loss: float = math.nan
    history: list[dict] = field(default_factory=list)
    stop: bool = False  # a callback may set this to end training early


def as_xy(data, param: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept an ``(x, y)`` pair of tensors or a prunelab Dataset (its train split)."""
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        return data.x_train, data.y_train
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(
                f"the '{param}' parameter of {where}: inputs and labels differ in length ({len(x)} vs {len(y)})."
            )
        if len(x) == 0:
            raise ValueError(f"the '{param}' parameter of {where} is empty (0 samples).")
        check_values(
            f"the inputs of the '{param}' parameter of {where}",
            x,
            hint="; inputs must be finite (drop or impute those examples)",
        )
        check_values(f"the targets of the '{param}' parameter of {where}", y)
        return x, y
    raise TypeError(
        f"the '{param}' parameter of {where} must be an (x, y) pair of tensors or a "
        f"prunelab Dataset. Got {type(data).__name__} instead."
    )


# ----------------------------------------------------------------------------- data
@dataclass
class Data:
    """Data resolved for ``fit``/``evaluate``: in memory (``whole``, sliced by index) or batches
    (``passes()`` starts one pass over them). ``first`` is the first example (in memory) or the
    first batch, for the dry run that checks the data fits the model before any work."""

    param: str
    where: str
    first: Batch
    whole: Batch | None = None
    passes: Callable[[], Iterable] | None = None
    one_shot: bool = False  # an iterator: one pass only
    trusted: bool = False  # in memory, targets checked whole: class indices, none ignored
    n_batches: int | None = None  # of an iterable with a length
    _passes_done: int = 0

    @property
    def in_memory(self) -> bool:
        return self.whole is not None

    def n_steps(self, batch_size: int | None) -> int | None:
        """Batches in one pass (None when an iterable does not say)."""
        if self.whole is None:
            return self.n_batches
        assert batch_size is not None  # in memory: _batch_size always gives one
        return math.ceil(self.whole.size / batch_size)

    def take(self, idx) -> Batch:
        """The in-memory examples at ``idx`` (a slice or an index tensor). A single image batch goes
        channels-last (:func:`_fast_layout`)."""
        w = self.whole
        assert w is not None  # only in-memory data is taken by index
        return Batch(
            tuple(_fast_layout(a[idx]) for a in w.args),
            {k: v[idx] for k, v in w.kwargs.items()},
            None if w.targets is None else w.targets[idx],
            w.hf_labels,
        )

    def batches(self, batch_size: int | None = None, order: torch.Tensor | None = None) -> Iterator[Batch]:
        """One pass: index slices of ``batch_size`` (in ``order`` if given) or the iterable's batches."""
        if self.whole is not None:
            assert batch_size is not None  # in memory: _batch_size always gives one
            for i in range(0, self.whole.size, batch_size):
                yield self.take(slice(i, i + batch_size) if order is None else order[i : i + batch_size])
            return
        if self.one_shot and self._passes_done:
            raise ValueError(
                f"the '{self.param}' parameter of {self.where} is an iterator and was used up by "
                f"its first pass; pass a list, a DataLoader or a function returning the batches."
            )
        self._passes_done += 1
        assert self.passes is not None  # set for every data not in memory
        for i, raw in enumerate(self.passes()):
            yield read_batch(raw, self.param, self.where, i)


def read_batch(raw, param: str, where: str, index: int) -> Batch:
    """One batch of an iterable (the forms of :mod:`prunelab.inputs`), its float tensors checked finite."""
    try:
        batch = as_batch(raw, where=where, index=index)
    except (TypeError, ValueError) as err:
        raise type(err)(
            f"the '{param}' parameter of {where} must be {DATA_FORMS}; its batch {index} is a "
            f"{type(raw).__name__}, and a batch must be {BATCH_FORMS} ({err})."
        ) from err
    for t in batch.tensors():
        check_values(
            f"the inputs of batch {index} of the '{param}' parameter of {where}",
            t,
            hint="; inputs must be finite (drop or impute those examples)",
        )
    if batch.targets is not None:
        check_values(f"the targets of batch {index} of the '{param}' parameter of {where}", batch.targets)
    return batch


def resolve_data(data, param: str, where: str, split: str) -> Data:
    """Read ``data`` as the module docstring says; a Dataset gives its ``split`` ("train"/"test")."""
    if hasattr(data, f"x_{split}") and hasattr(data, f"y_{split}"):
        data = (getattr(data, f"x_{split}"), getattr(data, f"y_{split}"))
    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = as_xy(data, param, where)
        return _in_memory(Batch((x,), {}, y), param, where)
    if isinstance(data, Mapping) and data and all(torch.is_tensor(v) for v in data.values()):
        return _in_memory(as_batch(data, where=where), param, where)
    if torch.is_tensor(data):
        raise TypeError(
            f"the '{param}' parameter of {where} is a single tensor; pass an (x, y) tuple of "
            f"tensors, or an iterable of batches."
        )
    if isinstance(data, (str, bytes, Mapping)):
        raise TypeError(
            f"the '{param}' parameter of {where} must be {DATA_FORMS}. Got {type(data).__name__} "
            f"instead{' (a dict whose values are not all tensors)' if isinstance(data, Mapping) else ''}."
        )
    if isinstance(data, Iterator):
        return _one_shot(data, param, where)
    if isinstance(data, Iterable):
        return _batches(lambda: data, param, where, _length(data))
    if callable(data):
        return _batches(data, param, where, None)
    raise TypeError(f"the '{param}' parameter of {where} must be {DATA_FORMS}. Got {type(data).__name__} instead.")


def _in_memory(whole: Batch, param: str, where: str) -> Data:
    tensors = whole.tensors() + ([whole.targets] if whole.targets is not None else [])
    lengths = sorted({len(t) if t.dim() else 0 for t in tensors})
    if len(lengths) > 1:
        raise ValueError(
            f"the '{param}' parameter of {where}: inputs and targets differ in length "
            f"({' vs '.join(map(str, lengths))})."
        )
    if lengths == [0]:
        raise ValueError(f"the '{param}' parameter of {where} is empty (0 samples).")
    for name, t in {**dict(enumerate(whole.args)), **whole.kwargs}.items():
        check_values(
            f"the inputs ({name!r}) of the '{param}' parameter of {where}",
            t,
            hint="; inputs must be finite (drop or impute those examples)",
        )
    if whole.targets is not None:
        check_values(f"the targets of the '{param}' parameter of {where}", whole.targets)
    return Data(param, where, whole.slice(0, 1), whole=whole)


def _length(data) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


_END = object()


def _first(iterable, param: str, where: str):
    if isinstance(iterable, (str, bytes, Mapping)) or torch.is_tensor(iterable) or not isinstance(iterable, Iterable):
        raise TypeError(
            f"the '{param}' parameter of {where} is a function, which must return an iterable of "
            f"batches. It returned a {type(iterable).__name__} instead."
        )
    raw = next(iter(iterable), _END)
    if raw is _END:
        raise ValueError(f"the '{param}' parameter of {where} is empty (no batches).")
    return raw


def _batches(passes: Callable[[], Iterable], param: str, where: str, n_batches: int | None) -> Data:
    first = read_batch(_first(passes(), param, where), param, where, 0)
    return Data(param, where, first, passes=passes, n_batches=n_batches)


def _one_shot(iterator: Iterator, param: str, where: str) -> Data:
    raw = _first(iterator, param, where)
    first = read_batch(raw, param, where, 0)
    return Data(param, where, first, passes=lambda: itertools.chain([raw], iterator), one_shot=True)


# ----------------------------------------------------------------------------- loss
@dataclass
class Terms:
    """One batch's loss and counts: ``weight`` is what the loss is a mean over (counted targets for
    the shape-inferred loss, examples for a user's loss); ``counted``/``correct`` give accuracy
    (``correct`` None when the targets are not classes or tokens of the logits)."""

    loss: torch.Tensor
    weight: int
    counted: int = 0
    correct: int | None = None
    tokens: bool = False
    soft: float | None = None  # with distillation: the T²·KL term (``loss`` stays the task loss)


def loss_terms(loss: Loss, output, batch: Batch, reduction: str = "mean", *, trusted: bool = False) -> Terms:
    """The loss of ``output`` on ``batch`` (``reduction`` "mean" or "sum") and its accuracy counts.
    ``trusted``: the targets were checked whole beforehand (:attr:`Data.trusted`): valid class
    indices with no ignored entry, so the per-batch checks (~60 µs a step) are skipped."""
    correct: int | None  # None: the output has no class or token targets
    if loss.is_cross_entropy:
        logits = loss.logits(output)
        flat_logits, flat_targets = _flat(logits, batch, loss.where, trusted)
        value = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction=reduction)
        counted, correct = _hits(flat_logits, flat_targets, trusted)
        return Terms(value, counted, counted, correct, logits.dim() == 3)
    value = loss(output, batch)
    if not torch.is_tensor(value) or value.numel() != 1:
        raise ValueError(
            f"{loss.where}: loss_fn must return a scalar tensor; it returned "
            f"{type(value).__name__}{tuple(value.shape) if torch.is_tensor(value) else ''}."
        )
    if reduction == "sum":
        value = value * batch.size
    try:
        counted, correct = _hits(*loss_targets(loss.logits(output), batch, where=loss.where))
    except ValueError:  # not class/token targets (a regression, a custom output)
        counted, correct = 0, None
    return Terms(value, batch.size, counted, correct)


def _flat(logits: torch.Tensor, batch: Batch, where: str, trusted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    targets = batch.targets
    if trusted and logits.dim() == 2 and targets is not None and targets.shape == logits.shape[:1]:
        return logits, targets
    return loss_targets(logits, batch, where=where)


def _hits(flat_logits: torch.Tensor, flat_targets: torch.Tensor, trusted: bool = False) -> tuple[int, int]:
    """Counted targets and argmax hits (an ignored target, -100, is never an argmax)."""
    correct = int((flat_logits.argmax(-1) == flat_targets).sum())
    ignored = 0 if trusted else int((flat_targets == IGNORE_INDEX).sum())
    return flat_targets.numel() - ignored, correct


def _describe(batch: Batch) -> str:
    parts = [f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in batch.args if torch.is_tensor(t)]
    parts += [
        f"{k} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        for k, t in batch.kwargs.items()
        if torch.is_tensor(t)
    ]
    return ", ".join(parts) or "no tensors"


@torch.no_grad()
def check_fits(model: nn.Module, data: Data, loss: Loss):
    """Run the model on ``data.first`` (eval mode, every module's mode restored) and the loss on its
    output, so that inputs of the wrong shape or dtype and targets that do not match the output are
    a ValueError naming the data, not an error deep in the model or mid-training. In-memory targets
    of the inferred loss are checked whole. Returns the output."""
    where, param = data.where, data.param
    try:
        with eval_mode(model):
            output = data.first.call(model)
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ValueError(
            f"the inputs of the '{param}' parameter of {where} ({_describe(data.first)}) do not fit "
            f"the model: {type(err).__name__}: {err}"
        ) from err
    try:
        if data.in_memory and loss.is_cross_entropy:  # every target now, not one batch at a time
            _check_all_targets(data, loss.logits(output).shape[-1])
        loss_terms(loss, output, data.first)
    except ValueError as err:
        raise ValueError(
            f"the '{param}' parameter of {where} does not fit the model's output: {str(err).removeprefix(f'{where}: ')}"
        ) from err
    except (RuntimeError, TypeError, IndexError) as err:
        culprit = "the loss_fn" if loss.user is not None else "the loss"
        raise ValueError(
            f"{culprit} of {where} fails on the first batch of '{param}': {type(err).__name__}: {err}"
        ) from err
    return output


def _check_all_targets(data: Data, n_out: int) -> None:
    assert data.whole is not None  # called for in-memory data only
    targets = data.whole.targets
    if targets is None:
        return
    what = f"its {'labels' if targets.dim() == 1 else 'targets'}"
    if targets.dtype != torch.int64:
        raise ValueError(
            f"{what} must be an int64 tensor (class indices). Got dtype {targets.dtype}, "
            f"shape {tuple(targets.shape)} instead."
        )
    valid = targets[targets != IGNORE_INDEX]
    if valid.numel():
        low, high = int(valid.min()), int(valid.max())
        if low < 0 or high >= n_out:
            raise ValueError(
                f"{what} must be class indices in [0, {n_out - 1}] (the model has {n_out} outputs; "
                f"{IGNORE_INDEX} is ignored). Got labels from {low} to {high}."
            )
    data.trusted = valid.numel() == targets.numel()


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


def _fast_layout(xb: torch.Tensor) -> torch.Tensor:
    """Image batches in channels-last order on the CPU: the convolutions then hand channels-last
    maps to max-pooling, whose channels-first CPU kernel is several times slower (LeNet-5 trains
    about 1.6x faster per step; ``benchmarks/conv_layout.py``). The values are the same; only the memory
    order changes, so a convolution may round its sums differently."""
    if torch.is_tensor(xb) and xb.dim() == 4 and xb.device.type == "cpu":
        return xb.to(memory_format=torch.channels_last)
    return xb


# ----------------------------------------------------------------------------- evaluate
#: The scoring options fit, evaluate and RecoveryMonitor share.
_SCORING: dict[str, list[Any]] = {"loss_fn": ["callable", None], "output_key": [str, None]}


@validate_params({"model": [MODEL], "data": [DATA], "batch_size": [BATCH_SIZE, None], **_SCORING})
def evaluate(
    model: nn.Module,
    data,
    *,
    batch_size: int | None = None,
    loss_fn: Callable | None = None,
    output_key: str | None = None,
) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``data``: a Dataset (its test split), an ``(x, y)``
    tuple or a dict of tensors (in slices of ``batch_size``, default 1024), or an iterable of
    batches. Token logits give token accuracy, ``perplexity`` = exp(mean loss) and ``tokens``."""
    where = "evaluate"
    check_materialised(model, where)
    loss = make_loss(loss_fn, output_key, where=where)
    with torch.random.fork_rng(devices=[]):  # peeking at a shuffling DataLoader draws a seed
        source = resolve_data(data, "data", where, split="test")
        batch_size = _batch_size(batch_size, source, 1024, data)
        check_fits(model, source, loss)
    return _evaluate(model, source, loss, batch_size)


@torch.no_grad()
def _evaluate(model: nn.Module, source: Data, loss: Loss, batch_size: int | None) -> dict[str, float]:
    total, weight, counted, correct, n, tokens = 0.0, 0, 0, 0, 0, False
    with eval_mode(model):
        for batch in source.batches(batch_size):
            terms = loss_terms(loss, batch.call(model), batch, reduction="sum", trusted=source.trusted)
            total += float(terms.loss)
            weight += terms.weight
            n += batch.size
            if terms.correct is not None:
                counted, correct = counted + terms.counted, correct + terms.correct
            tokens = tokens or terms.tokens
    mean = total / weight if weight else math.nan
    result = {"loss": mean, "accuracy": correct / counted if counted else math.nan, "n": n}
    if tokens:
        result.update(perplexity=math.exp(mean) if mean < 709 else math.inf, tokens=counted)
    return result


def _batch_size(batch_size, source: Data, default: int, data) -> int | None:
    if source.in_memory:
        if batch_size is None:
            return default
        return int(batch_size)
    if batch_size is not None:
        raise ValueError(
            f"the 'batch_size' parameter of {source.where} applies to in-memory data (a Dataset, an "
            f"(x, y) tuple, a dict of tensors); the batches of a {type(data).__name__} are used as "
            f"they come. Got batch_size={batch_size!r}; leave it out (or batch the data yourself)."
        )
    return None


# ----------------------------------------------------------------------------- fit
@validate_params(
    {
        "model": [MODEL],
        "data": [DATA],
        "epochs": [EPOCHS],
        "batch_size": [BATCH_SIZE, None],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "optimizer": [Options(OPTIMIZERS), Types(torch.optim.Optimizer)],
        "momentum": [Interval(Real, 0, 1, closed="left")],
        "weight_decay": [Interval(Real, 0, None)],
        "regularizer": [Types(str, Mapping, Regularizer), None],
        "pruner": [Types(Pruner), None],
        "seed": [SEED],
        "val": [DATA, None],
        "progress": [bool, None],
        **_SCORING,
        "callbacks": [Types(list, tuple)],
        "max_steps": [STEP, None],
        "distill_from": [Model("an nn.Module (the teacher model)"), None],
        "distill_weight": [FRACTION, None],
        "temperature": [Interval(Real, 0, None, closed="neither"), None],
        "lr_drop": [Types(list, tuple), None],
        "lr_drop_factor": [Interval(Real, 0, 1, closed="neither")],
    }
)
def fit(
    model: nn.Module,
    data,
    *,
    epochs: int = 1,
    batch_size: int | None = None,
    lr: float = 0.01,
    optimizer: str | torch.optim.Optimizer = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    regularizer: str | dict | Regularizer | None = None,
    reg_strength: float | None = None,
    pruner: Pruner | None = None,
    seed: int = 0,
    val=None,
    progress: bool | None = None,
    loss_fn: Callable | None = None,
    output_key: str | None = None,
    callbacks: Sequence[Callback] = (),
    max_steps: int | None = None,
    distill_from: nn.Module | None = None,
    distill_weight: float | None = None,
    temperature: float | None = None,
    lr_drop: Sequence[int] | None = None,
    lr_drop_factor: float = 0.1,
) -> list[dict]:
    """Train ``model`` in place; returns the per-epoch history (list of dicts).

    ``data`` is a Dataset (train split; its val split, if any, is evaluated each epoch unless
    ``val`` is given), an ``(x, y)`` tuple or a dict of tensors (shuffled, in batches of
    ``batch_size``, default 64), or an iterable of batches — a list, a DataLoader, a function
    returning a fresh iterable each epoch, or an iterator (one epoch only) — used as they come.
    ``val`` is anything :func:`evaluate` takes. The loss is inferred from the output's shape
    (classes or next token) unless ``loss_fn(output, targets)`` is given; ``output_key`` names the
    logits of a dict output. ``optimizer`` is ``"sgd"`` (with ``momentum``), ``"adam"``,
    ``"adamw"`` or a ready optimiser. ``regularizer`` ``"l1"``/``"l2"``/``"group-lasso"`` with
    ``reg_strength`` penalises the prunable weights (those of ``pruner`` if given). ``pruner`` is
    attached to the optimiser and stepped after every optimiser step. Raises
    :class:`TrainingDiverged` on a NaN/inf loss, and a ValueError before training when the data
    or the model's parameters hold NaN/inf or the data does not fit the model.

    ``distill_from`` (a teacher model, typically the unpruned model) adds knowledge distillation
    (:mod:`prunelab.distillation`): the loss becomes ``(1 − w) · task loss + w · T² · KL(softmax(
    teacher/T) ‖ softmax(student/T))`` averaged over the positions the task loss counts, with
    ``w = distill_weight`` in [0, 1] (default 0.5) and ``T = temperature`` > 0 (default 2.0). The
    teacher runs on each batch in eval mode without autograd. The history then also records
    ``task_loss`` and ``distill_loss`` (the ``T² · KL`` term); ``loss`` is the combined objective.

    ``lr_drop`` (a step decay): epoch counts e ≥ 1; after epoch e the learning rate of every
    parameter group is multiplied by ``lr_drop_factor`` (in (0, 1), default 0.1), so with
    ``lr_drop=[6, 8]`` epochs 1–6 train at ``lr``, 7–8 at ``0.1·lr`` and 9… at ``0.01·lr``. The
    history records each epoch's ``lr``.
    """
    where = "fit"
    check_materialised(model, where)
    check_trainable(model, where)
    for name, param in model.named_parameters():  # else the first loss is NaN and "diverged" misleads
        check_finite(f"the parameter {name!r} of the model given to fit", param)
    epochs, seed = int(epochs), int(seed)
    if max_steps is not None:
        max_steps = int(max_steps)
    loss = make_loss(loss_fn, output_key, where=where)
    distill = make_distillation(model, distill_from, distill_weight, temperature, where=where)
    source, val_source, batch_size = _fit_data(model, data, val, batch_size, loss, epochs, distill)
    drops = _lr_drops(lr_drop)
    optimizer = _make_optimizer(model, optimizer, lr, momentum, weight_decay)
    if pruner is not None:
        if pruner.model is not model:
            raise ValueError("the 'pruner' parameter of fit prunes a different model than the one given.")
    reg_targets = None
    reg: Regularizer | None = None
    if regularizer is not None:
        reg = make_regularizer(regularizer, reg_strength, where=where)
        reg_targets = pruner.targets if pruner is not None else resolve_targets(model, where=where)
        reg.bind(reg_targets)

    state = TrainState(model, optimizer)
    hooks: Sequence[Callback | Pruner] = callbacks
    if pruner is not None:
        pruner.attach(optimizer)
        hooks = [pruner, *callbacks]
    per_epoch = source.n_steps(batch_size)
    total = None if per_epoch is None else epochs * per_epoch
    if max_steps is not None:
        total = max_steps if total is None else min(max_steps, total)
    loop = _Loop(
        state,
        source,
        val_source,
        batch_size,
        loss,
        reg,
        reg_targets,
        list(hooks),
        math.inf if total is None else total,
        distill,
    )
    teacher_mode = eval_mode(distill.teacher) if distill is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), teacher_mode:
        torch.manual_seed(seed)
        shuffle = torch.Generator().manual_seed(seed)
        for cb in hooks:
            cb.on_train_begin(state)
        bar = tqdm(total=total, disable=not _show_progress(progress), desc="train", unit="step", leave=False)
        model.train()
        try:
            for epoch in range(epochs):
                if epoch in drops:  # after epoch e (1-based) = before epoch index e
                    for group in optimizer.param_groups:
                        group["lr"] *= float(lr_drop_factor) ** drops[epoch]
                if not loop.epoch(epoch, shuffle, bar, pruner):
                    break
                if drops:
                    state.history[-1]["lr"] = optimizer.param_groups[0]["lr"]
                if state.stop:
                    break
        finally:
            bar.close()
    if pruner is not None and not pruner.done:
        warnings.warn(
            f"training ended after {pruner.step_count} pruner steps, before the schedule's last "
            f"event (step {pruner.schedule.last_step}); sparsity is {pruner.sparsity():.4f}, "
            f"not {pruner.schedule.final_sparsity:.4f}. Train longer or shorten the schedule.",
            stacklevel=2,
        )
    return state.history


def _lr_drops(lr_drop) -> dict[int, int]:
    """``lr_drop``'s epochs as ``{epoch index: times the factor applies there}`` (an epoch listed
    twice drops twice)."""
    drops: dict[int, int] = {}
    for e in lr_drop or ():
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(
                f"the 'lr_drop' parameter of fit must be a list of epochs ≥ 1. Got {list(lr_drop)!r} instead."
            )
        drops[e] = drops.get(e, 0) + 1
    return drops


def _fit_data(
    model, data, val, batch_size, loss: Loss, epochs: int, distill: Distillation | None = None
) -> tuple[Data, Data | None, int | None]:
    """Resolve and dry-run ``data`` and ``val`` (inside a forked RNG: peeking at a shuffling
    DataLoader draws a seed), the teacher too, and refuse an iterator that would have to last
    several epochs."""
    with torch.random.fork_rng(devices=[]):
        source = resolve_data(data, "data", "fit", split="train")
        batch_size = _batch_size(batch_size, source, 64, data)
        if val is None and getattr(data, "x_val", None) is not None:
            val = (data.x_val, data.y_val)
        val_source = None if val is None else resolve_data(val, "val", "fit", split="test")
        for part in (source, val_source):
            if part is not None and part.one_shot and epochs > 1:
                raise ValueError(
                    f"the '{part.param}' parameter of fit is an iterator, which runs dry after one "
                    f"pass, and epochs={epochs}; pass a list, a DataLoader or a function returning "
                    f"a fresh iterable of batches."
                )
        output = check_fits(model, source, loss)
        if distill is not None:
            check_teacher(distill, output, source.first, loss, param=source.param, where=source.where)
        if val_source is not None:
            check_fits(model, val_source, loss)
    return source, val_source, batch_size


def _make_optimizer(model, optimizer, lr, momentum, weight_decay) -> torch.optim.Optimizer:
    if isinstance(optimizer, str):  # the names and ranges are checked by fit's declarations
        return OPTIMIZERS[optimizer](model.parameters(), float(lr), float(momentum), float(weight_decay))
    return optimizer


@dataclass
class _Loop:
    """One ``fit`` run's fixed parts; :meth:`epoch` trains one pass and appends its record."""

    state: TrainState
    source: Data
    val: Data | None
    batch_size: int | None
    loss: Loss
    regularizer: Regularizer | None
    reg_targets: list | None
    callbacks: list
    total: float
    distill: Distillation | None = None

    def epoch(self, epoch: int, shuffle: torch.Generator, bar, pruner: Pruner | None) -> bool:
        """Train one pass; False when no step was left to take (nothing recorded)."""
        state = self.state
        state.epoch = epoch
        started = time.perf_counter()
        order = None
        if self.source.whole is not None:
            order = torch.randperm(self.source.whole.size, generator=shuffle).to(self.source.first.tensors()[0].device)
        loss_sum, weight, counted, correct, steps = 0.0, 0, 0, 0, 0
        task_sum, soft_sum = 0.0, 0.0
        if state.step >= self.total or state.stop:
            return False
        for batch in self.source.batches(self.batch_size, order):
            terms = self.step(batch, epoch)
            loss_sum += state.loss * terms.weight
            if terms.soft is not None:
                task_sum += float(terms.loss.detach()) * terms.weight
                soft_sum += terms.soft * terms.weight
            weight += terms.weight
            if terms.correct is not None:
                counted, correct = counted + terms.counted, correct + terms.correct
            steps += 1
            for cb in self.callbacks:
                cb.on_step_end(state)
            bar.update(1)
            if state.step >= self.total or state.stop:
                break
        record = {
            "epoch": epoch + 1,
            "step": state.step,
            "loss": loss_sum / weight if weight else math.nan,
            "train_accuracy": correct / counted if counted else math.nan,
            "seconds": time.perf_counter() - started,
        }
        if self.distill is not None and self.distill.weight > 0:
            record.update(
                task_loss=task_sum / weight if weight else math.nan,
                distill_loss=soft_sum / weight if weight else math.nan,
            )
        if pruner is not None:
            record["sparsity"] = pruner.sparsity()
        if self.val is not None:
            metrics = _evaluate(state.model, self.val, self.loss, 1024 if self.val.in_memory else None)
            record.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"])
        state.history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        for cb in self.callbacks:
            cb.on_epoch_end(state)
        return True

    def step(self, batch: Batch, epoch: int) -> Terms:
        state = self.state
        state.optimizer.zero_grad(set_to_none=True)
        output = batch.call(state.model)
        terms = loss_terms(self.loss, output, batch, trusted=self.source.trusted)
        loss = terms.loss
        if self.distill is not None and self.distill.weight > 0:  # weight 0: plain training, no teacher run
            soft = self.distill.term(self.loss, output, batch, trusted=self.source.trusted)
            terms.soft = float(soft.detach())
            loss = self.distill.combine(loss, soft)
        if self.regularizer is not None:
            assert self.reg_targets is not None  # bound with the regularizer in fit
            loss = loss + self.regularizer.penalty(self.reg_targets)
        if not torch.isfinite(loss.detach()):
            raise TrainingDiverged(
                f"training loss became {loss.item()} at epoch {epoch}, step {state.step}; lower the learning rate."
            )
        loss.backward()
        state.optimizer.step()
        state.step += 1
        state.loss = float(loss.detach())
        return terms


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    """Optimiser steps in one epoch (the last, smaller batch included)."""
    return math.ceil(n_samples / batch_size)


class RecoveryMonitor(Callback):
    """Evaluates every ``every`` steps and records how many steps after ``start`` (the last
    prune of a schedule; 0 for one-shot) accuracy first got back within ``tolerance`` of
    ``target`` (``None`` if never). With ``stop=True`` training ends there. The curve
    ``[(step, accuracy), ...]`` starts with step 0 (before any training). ``data`` is anything
    :func:`evaluate` takes except an iterator (it is evaluated many times); ``loss_fn`` and
    ``output_key`` are :func:`evaluate`'s."""

    @validate_params(
        {
            "data": [DATA],
            "target": [FRACTION],
            "tolerance": [Interval(Real, 0, 1)],
            "every": [EVERY],
            "stop": [bool],
            "start": [STEP],
            **_SCORING,
        }
    )
    def __init__(
        self,
        data,
        target: float,
        tolerance: float = 0.001,
        every: int = 50,
        stop: bool = False,
        start: int = 0,
        *,
        loss_fn: Callable | None = None,
        output_key: str | None = None,
    ):
        if isinstance(data, Iterator):
            raise TypeError(
                "the 'data' parameter of RecoveryMonitor is an iterator, which runs dry after one "
                "evaluation; pass a Dataset, an (x, y) tuple, a list or a DataLoader."
            )
        self.data = data
        self.target, self.tolerance = float(target), float(tolerance)
        self.every, self.stop, self.start = int(every), stop, int(start)
        self.loss_fn, self.output_key = loss_fn, output_key
        self.steps_to_recover: int | None = None
        self.curve: list[tuple[int, float]] = []

    def _check(self, state: TrainState) -> None:
        accuracy = evaluate(state.model, self.data, loss_fn=self.loss_fn, output_key=self.output_key)["accuracy"]
        self.curve.append((state.step, accuracy))
        if (
            self.steps_to_recover is None
            and state.step >= self.start
            and accuracy >= self.target - self.tolerance - 1e-12
        ):
            self.steps_to_recover = state.step - self.start
            if self.stop:
                state.stop = True

    def on_train_begin(self, state: TrainState) -> None:
        self._check(state)

    def on_step_end(self, state: TrainState) -> None:
        if state.step % self.every == 0 or state.step == self.start:
            self._check(state)


@dataclass(frozen=True)
class RetrainResult:
    steps_to_recover: int | None  # optimiser steps until within tolerance (None: not reached)
    accuracy: float  # at the end
    curve: list  # [(step, accuracy)] every ``eval_every`` steps
    history: list  # fit's per-epoch history


@validate_params(
    {
        "model": [MODEL],
        "data": [DATA],
        "pruner": [Types(Pruner)],
        "target_accuracy": [FRACTION],
        "eval_data": [DATA, None],
        "tolerance": [Interval(Real, 0, 1)],
        "eval_every": [EVERY],
        "max_epochs": [EPOCHS],
        "stop_when_recovered": [bool],
    }
)
def retrain(
    model: nn.Module,
    data,
    *,
    pruner: Pruner,
    target_accuracy: float,
    eval_data=None,
    tolerance: float = 0.001,
    eval_every: int = 50,
    max_epochs: int = 10,
    stop_when_recovered: bool = True,
    **fit_kwargs,
) -> RetrainResult:
    """Fine-tune a pruned model with its masks fixed until its accuracy on ``eval_data``
    (default: the dataset's test split) is back within ``tolerance`` of ``target_accuracy``,
    and report how many optimiser steps that took (the L-OBS paper's retraining iterations).
    ``fit_kwargs`` go to :func:`fit` (lr, batch_size, optimizer, seed, loss_fn, output_key, ...)."""
    if eval_data is None:
        if not hasattr(data, "x_test"):
            raise ValueError("retrain needs eval_data= (anything evaluate takes) when data is not a Dataset.")
        eval_data = (data.x_test, data.y_test)
    scoring = {k: fit_kwargs.get(k) for k in ("loss_fn", "output_key")}
    monitor = RecoveryMonitor(eval_data, target_accuracy, tolerance, eval_every, stop=stop_when_recovered, **scoring)
    fit_kwargs.setdefault("progress", False)
    history = fit(
        model,
        data,
        epochs=max_epochs,
        pruner=pruner,
        callbacks=[monitor, *fit_kwargs.pop("callbacks", ())],
        **fit_kwargs,
    )
    return RetrainResult(
        monitor.steps_to_recover, evaluate(model, eval_data, **scoring)["accuracy"], monitor.curve, history
    )
