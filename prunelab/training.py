"""Training and evaluation over in-memory tensors.

Whole datasets are tensors; a batch is an index slice of them (no per-sample
Python loop, no DataLoader). ``fit`` is deterministic for a given ``seed`` and
initial model on the CPU: the shuffling stream comes from a generator seeded
with ``seed``, and dropout draws from the global RNG, which ``fit`` seeds inside
a forked RNG state so the caller's random state is left untouched.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunelab._validation import check_choice, check_finite, check_number, check_type
from prunelab.pruning.pruner import Pruner
from prunelab.pruning.regularizers import Regularizer, make_regularizer
from prunelab.pruning.targets import resolve_targets

OPTIMIZERS = {
    "sgd": lambda params, lr, momentum, weight_decay: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay),
    "adam": lambda params, lr, momentum, weight_decay: torch.optim.Adam(
        params, lr=lr, weight_decay=weight_decay),
    "adamw": lambda params, lr, momentum, weight_decay: torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay),
}


class TrainingDiverged(FloatingPointError):
    """The training loss became NaN or infinite."""


class Callback:
    """Hooks ``fit`` calls; override what you need. ``state`` is the live TrainState."""

    def on_train_begin(self, state: "TrainState") -> None: ...
    def on_step_end(self, state: "TrainState") -> None: ...
    def on_epoch_end(self, state: "TrainState") -> None: ...


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    loss: float = math.nan
    history: list[dict] = field(default_factory=list)
    stop: bool = False      # a callback may set this to end training early


def as_xy(data, param: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept an ``(x, y)`` pair of tensors or a prunelab Dataset (its train split)."""
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        return data.x_train, data.y_train
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"the '{param}' parameter of {where}: inputs and labels differ in length "
                             f"({len(x)} vs {len(y)}).")
        if len(x) == 0:
            raise ValueError(f"the '{param}' parameter of {where} is empty (0 samples).")
        check_finite(f"the inputs of the '{param}' parameter of {where}", x,
                     hint="; inputs must be finite (drop or impute those examples)")
        check_finite(f"the targets of the '{param}' parameter of {where}", y)
        return x, y
    raise TypeError(f"the '{param}' parameter of {where} must be an (x, y) pair of tensors or a "
                    f"prunelab Dataset. Got {type(data).__name__} instead.")


@torch.no_grad()
def check_fits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, param: str, where: str,
               classes: bool = True) -> None:
    """Run the model on the first example (eval mode, nothing changes) so that inputs of the
    wrong shape or dtype are a ValueError naming the data, not an error deep in the model; with
    ``classes`` (the default cross-entropy loss) the labels must be int64 class indices below
    the model's number of outputs."""
    was_training = model.training
    model.eval()
    try:
        out = model(x[:1])
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise ValueError(f"the inputs of the '{param}' parameter of {where} (shape {tuple(x.shape)}, "
                         f"dtype {x.dtype}) do not fit the model: {type(err).__name__}: {err}") from err
    finally:
        model.train(was_training)
    if not classes:
        return
    if y.dtype != torch.int64 or y.dim() != 1:
        raise ValueError(f"the labels of the '{param}' parameter of {where} must be an int64 tensor of shape "
                         f"({len(y)},) (class indices). Got dtype {y.dtype}, shape {tuple(y.shape)} instead.")
    n_out = out.shape[-1] if out.dim() >= 2 else 1
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= n_out:
        raise ValueError(f"the labels of the '{param}' parameter of {where} must be class indices in "
                         f"[0, {n_out - 1}] (the model has {n_out} outputs). Got labels from {low} to {high}.")


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else bool(progress)


def _fast_layout(xb: torch.Tensor) -> torch.Tensor:
    """Image batches in channels-last order on the CPU: the convolutions then hand channels-last
    maps to max-pooling, whose channels-first CPU kernel is several times slower (LeNet-5 trains
    about 1.6x faster per step; ``benchmarks/conv_layout.py``). The values are the same; only the memory
    order changes, so a convolution may round its sums differently."""
    if xb.dim() == 4 and xb.device.type == "cpu":
        return xb.to(memory_format=torch.channels_last)
    return xb


@torch.no_grad()
def evaluate(model: nn.Module, data, *, batch_size: int = 1024,
             loss_fn: Callable | None = None) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``data`` (``(x, y)`` or a Dataset's test split)."""
    if hasattr(data, "x_test"):
        data = (data.x_test, data.y_test)
    x, y = as_xy(data, "data", "evaluate")
    batch_size = check_number("batch_size", batch_size, where="evaluate", low=1, integer=True)
    check_fits(model, x, y, "data", "evaluate", classes=loss_fn is None)
    loss_fn = loss_fn or nn.functional.cross_entropy
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for i in range(0, len(x), batch_size):
            out = model(_fast_layout(x[i:i + batch_size]))
            yb = y[i:i + batch_size]
            total_loss += float(loss_fn(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return {"loss": total_loss / len(x), "accuracy": correct / len(x), "n": len(x)}


def fit(model: nn.Module, data, *, epochs: int = 1, batch_size: int = 64, lr: float = 0.01,
        optimizer: "str | torch.optim.Optimizer" = "sgd", momentum: float = 0.9,
        weight_decay: float = 0.0, regularizer: "str | dict | Regularizer | None" = None,
        reg_strength: float | None = None, pruner: Pruner | None = None, seed: int = 0,
        val=None, progress: bool | None = None, loss_fn: Callable | None = None,
        callbacks: Sequence[Callback] = (), max_steps: int | None = None) -> list[dict]:
    """Train ``model`` in place; returns the per-epoch history (list of dicts).

    ``data`` is an ``(x, y)`` pair or a Dataset (train split; its val split, if any,
    is evaluated each epoch unless ``val`` is given). ``optimizer`` is ``"sgd"``
    (with ``momentum``), ``"adam"``, ``"adamw"`` or a ready optimiser. ``regularizer``
    ``"l1"``/``"l2"``/``"group-lasso"`` with ``reg_strength`` penalises the prunable
    weights (those of ``pruner`` if given). ``pruner`` is attached to the optimiser and
    stepped after every optimiser step. Raises :class:`TrainingDiverged` on a NaN/inf loss,
    and a ValueError before training when the data or the model's parameters hold NaN/inf.
    """
    where = "fit"
    check_type("model", model, nn.Module, where=where)
    for name, param in model.named_parameters():   # else the first loss is NaN and "diverged" misleads
        check_finite(f"the parameter {name!r} of the model given to fit", param)
    x, y = as_xy(data, "data", where)
    if val is None and getattr(data, "x_val", None) is not None:
        val = (data.x_val, data.y_val)
    if val is not None:
        val = as_xy(val, "val", where)
    check_fits(model, x, y, "data", where, classes=loss_fn is None)
    if val is not None:
        check_fits(model, *val, "val", where, classes=loss_fn is None)
    epochs = check_number("epochs", epochs, where=where, low=0, integer=True)
    batch_size = check_number("batch_size", batch_size, where=where, low=1, integer=True)
    seed = check_number("seed", seed, where=where, low=0, integer=True)
    if max_steps is not None:
        max_steps = check_number("max_steps", max_steps, where=where, low=0, integer=True)
    if isinstance(optimizer, str):
        lr = check_number("lr", lr, where=where, low=0.0, closed="neither")
        momentum = check_number("momentum", momentum, where=where, low=0.0, high=1.0, closed="left")
        weight_decay = check_number("weight_decay", weight_decay, where=where, low=0.0)
        name = check_choice("optimizer", optimizer, OPTIMIZERS, where=where)
        optimizer = OPTIMIZERS[name](model.parameters(), lr, momentum, weight_decay)
    else:
        check_type("optimizer", optimizer, torch.optim.Optimizer, where=where,
                   expected=f"one of {', '.join(OPTIMIZERS)} or a torch.optim.Optimizer")
    if pruner is not None:
        check_type("pruner", pruner, Pruner, where=where)
        if pruner.model is not model:
            raise ValueError("the 'pruner' parameter of fit prunes a different model than the one given.")
    reg_targets = None
    if regularizer is not None:
        regularizer = make_regularizer(regularizer, reg_strength, where=where)
        reg_targets = pruner.targets if pruner is not None else resolve_targets(model, where=where)
        regularizer.bind(reg_targets)
    loss_fn = loss_fn or nn.functional.cross_entropy

    state = TrainState(model, optimizer)
    if pruner is not None:
        pruner.attach(optimizer)
        callbacks = [pruner, *callbacks]
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shuffle = torch.Generator().manual_seed(seed)
        for cb in callbacks:
            cb.on_train_begin(state)
        bar = tqdm(total=total, disable=not _show_progress(progress), desc="train", unit="step",
                   leave=False)
        model.train()
        try:
            for epoch in range(epochs):
                state.epoch = epoch
                started = time.perf_counter()
                order = torch.randperm(n, generator=shuffle).to(x.device)
                loss_sum, correct, seen = 0.0, 0, 0
                for i in range(0, n, batch_size):
                    if state.step >= total or state.stop:
                        break
                    idx = order[i:i + batch_size]
                    xb, yb = x[idx], y[idx]
                    optimizer.zero_grad(set_to_none=True)
                    out = model(_fast_layout(xb))
                    loss = loss_fn(out, yb)
                    if regularizer is not None:
                        loss = loss + regularizer.penalty(reg_targets)
                    if not torch.isfinite(loss.detach()):
                        raise TrainingDiverged(f"training loss became {loss.item()} at epoch {epoch}, "
                                               f"step {state.step}; lower the learning rate.")
                    loss.backward()
                    optimizer.step()
                    state.step += 1
                    state.loss = float(loss.detach())
                    loss_sum += state.loss * len(idx)
                    correct += int((out.argmax(1) == yb).sum())
                    seen += len(idx)
                    for cb in callbacks:
                        cb.on_step_end(state)
                    bar.update(1)
                if seen == 0:
                    break
                record = {"epoch": epoch + 1, "step": state.step, "loss": loss_sum / seen,
                          "train_accuracy": correct / seen, "seconds": time.perf_counter() - started}
                if pruner is not None:
                    record["sparsity"] = pruner.sparsity()
                if val is not None:
                    metrics = evaluate(model, val, loss_fn=loss_fn)
                    record.update(val_loss=metrics["loss"], val_accuracy=metrics["accuracy"])
                state.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                for cb in callbacks:
                    cb.on_epoch_end(state)
                if state.stop:
                    break
        finally:
            bar.close()
    if pruner is not None and not pruner.done:
        warnings.warn(f"training ended after {pruner.step_count} pruner steps, before the schedule's last "
                      f"event (step {pruner.schedule.last_step}); sparsity is {pruner.sparsity():.4f}, "
                      f"not {pruner.schedule.final_sparsity:.4f}. Train longer or shorten the schedule.",
                      stacklevel=2)
    return state.history


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    """Optimiser steps in one epoch (the last, smaller batch included)."""
    return math.ceil(n_samples / batch_size)


class RecoveryMonitor(Callback):
    """Evaluates every ``every`` steps and records how many steps after ``start`` (the last
    prune of a schedule; 0 for one-shot) accuracy first got back within ``tolerance`` of
    ``target`` (``None`` if never). With ``stop=True`` training ends there. The curve
    ``[(step, accuracy), ...]`` starts with step 0 (before any training)."""

    def __init__(self, data, target: float, tolerance: float = 0.001, every: int = 50,
                 stop: bool = False, start: int = 0):
        self.data = data
        self.target = check_number("target", target, where="RecoveryMonitor", low=0.0, high=1.0)
        self.tolerance = check_number("tolerance", tolerance, where="RecoveryMonitor", low=0.0)
        self.every = check_number("every", every, where="RecoveryMonitor", low=1, integer=True)
        self.stop = stop
        self.start = check_number("start", start, where="RecoveryMonitor", low=0, integer=True)
        self.steps_to_recover: int | None = None
        self.curve: list[tuple[int, float]] = []

    def _check(self, state: TrainState) -> None:
        accuracy = evaluate(state.model, self.data)["accuracy"]
        self.curve.append((state.step, accuracy))
        if (self.steps_to_recover is None and state.step >= self.start
                and accuracy >= self.target - self.tolerance - 1e-12):
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
    steps_to_recover: int | None      # optimiser steps until within tolerance (None: not reached)
    accuracy: float                   # at the end
    curve: list                       # [(step, accuracy)] every ``eval_every`` steps
    history: list                     # fit's per-epoch history


def retrain(model: nn.Module, data, *, pruner: Pruner, target_accuracy: float, eval_data=None,
            tolerance: float = 0.001, eval_every: int = 50, max_epochs: int = 10,
            stop_when_recovered: bool = True, **fit_kwargs) -> RetrainResult:
    """Fine-tune a pruned model with its masks fixed until its accuracy on ``eval_data``
    (default: the dataset's test split) is back within ``tolerance`` of ``target_accuracy``,
    and report how many optimiser steps that took (the L-OBS paper's retraining iterations).
    ``fit_kwargs`` go to :func:`fit` (lr, batch_size, optimizer, seed, ...)."""
    if eval_data is None:
        if not hasattr(data, "x_test"):
            raise ValueError("retrain needs eval_data=(x, y) when data is not a Dataset.")
        eval_data = (data.x_test, data.y_test)
    monitor = RecoveryMonitor(eval_data, target_accuracy, tolerance, eval_every, stop=stop_when_recovered)
    fit_kwargs.setdefault("progress", False)
    history = fit(model, data, epochs=max_epochs, pruner=pruner,
                  callbacks=[monitor, *fit_kwargs.pop("callbacks", ())], **fit_kwargs)
    return RetrainResult(monitor.steps_to_recover, evaluate(model, eval_data)["accuracy"],
                         monitor.curve, history)
