"""What every task kind prepares the same way: datasets, training budgets, distillation and
latency options, and the trained dense model with its cache.

The ``prepare_*`` functions validate one spec entry into its resolved config part (errors go to
the :class:`~prunelab.runs.tasks.Checker`, each naming its spec path); :func:`load_prepared_dataset`,
:func:`dense_model` and :func:`train_kwargs` turn a resolved config back into a dataset, a trained
dense model (cached per dataset, model, seed and dense budget, so a study's many methods and
levels share one dense model per seed) and ``fit`` arguments.
"""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path

import torch

from prunelab._validation import suggest
from prunelab.data import DATASETS, data_root
from prunelab.data.examples import token_example
from prunelab.models import build_model
from prunelab.runs.tasks import Checker
from prunelab.store import digest
from prunelab.training import OPTIMIZERS, Callback, fit

#: Bump when the meaning of dense training changes, so cached dense models are not reused.
DENSE_VERSION = 1


DATASET_KEYS = ("name", "label", "subset", "validation", "standardize", "training")


TRAINING_DEFAULTS = {
    "epochs": 10,
    "finetune_epochs": 5,
    "batch_size": 64,
    "lr": 0.05,
    "finetune_lr": None,
    "optimizer": "sgd",
    "momentum": 0.9,
    "weight_decay": 0.0,
    "retrain_tolerance": None,
    "eval_every": 50,
}


DISTILL_DEFAULTS = {"weight": 0.5, "temperature": 2.0}


LATENCY_DEFAULTS = {"batch_sizes": [1, 64], "min_sparsity": 0.5, "threads": 1, "rounds": 5}


DENSE_KEYS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay")


OPTIONAL_TRAINING = ("patience", "finetune_steps")  # resolved only when given, so older runs keep their ids

#: Optional lists of steps (the prune task's ``report_at_steps``), resolved only when given, like
#: :data:`OPTIONAL_TRAINING`.
OPTIONAL_TRAINING_STEPS = ("report_at_steps",)

#: The dense training's step decay (``fit``'s ``lr_drop`` epochs and ``lr_drop_factor``), resolved
#: only when given, like :data:`OPTIONAL_TRAINING`; part of the dense cache key when given.
LR_DROP_KEYS = ("lr_drop", "lr_drop_factor")


# ---------------------------------------------------------------- dataset
def prepare_dataset(path: str, entry: dict, checker: Checker) -> dict | None:
    if "name" not in entry:
        checker.error(path, "missing 'name'")
        return None
    source = checker.attempt(f"{path}.name", DATASETS.get, entry["name"], param="dataset", where="spec")
    if source is not None and hasattr(source, "token_streams"):
        return _prepare_text_dataset(path, entry, source, checker)
    if source is None:
        return None
    options = {k: v for k, v in entry.items() if k not in DATASET_KEYS}
    unknown = sorted(set(options) - set(source.options))
    if unknown:
        valid = ", ".join((*DATASET_KEYS, *source.options))
        checker.error(f"{path}.{unknown[0]}", f"unknown option for dataset '{source.name}'; valid: {valid}")
        return None
    missing = checker.attempt(path, source.missing_files, None, **options)
    if missing:
        checker.error(
            path,
            f"dataset '{source.name}' cannot be loaded: missing {', '.join(missing)} under "
            f"the data root {data_root()} (set PRUNELAB_DATA to the folder holding them, or "
            f"run `prunelab data fetch {source.name}`)",
        )
    if missing is None or missing:
        return None
    n_train = source.sizes.get("train", 0)
    n_test = source.sizes.get("test", 0)
    if options.get("swap"):
        n_train, n_test = n_test, n_train
    subset = entry.get("subset")
    if subset is not None:
        if not isinstance(subset, dict) or not set(subset) <= {"n_train", "n_test"}:
            checker.error(f"{path}.subset", f"must be a mapping with n_train and/or n_test; got {subset!r}")
            return None
        for key, limit in (("n_train", n_train), ("n_test", n_test)):
            if key in subset:
                got = checker.number(f"{path}.subset.{key}", subset[key], low=1, high=limit, integer=True)
                if got is None:
                    return None
        n_train = subset.get("n_train", n_train)
    validation = entry.get("validation", 0)
    if validation:
        if isinstance(validation, float):
            got = checker.number(f"{path}.validation", validation, low=0.0, high=1.0, closed="neither")
            n_val = None if got is None else round(got * n_train)
        else:
            n_val = checker.number(f"{path}.validation", validation, low=1, high=n_train - 1, integer=True)
        if n_val is None:
            return None
        n_train -= n_val
    standardize = entry.get("standardize", False)
    if not isinstance(standardize, bool):
        checker.error(f"{path}.standardize", f"must be true or false; got {standardize!r}")
        return None
    return {
        "config": {
            "name": source.name,
            "options": options,
            "subset": subset,
            "validation": validation or 0,
            "standardize": standardize,
        },
        "input_shape": tuple(source.input_shape),
        "n_classes": source.n_classes,
        "n_train": n_train,
        "has_val": bool(validation),
        "dry": {"input_shape": tuple(source.input_shape)},
    }


TEXT_NOT_APPLICABLE = {
    "validation": "a text dataset has its own validation split (its valid text)",
    "standardize": "token ids are not standardised",
}


def _prepare_text_dataset(path: str, entry: dict, source, checker: Checker) -> dict | None:
    """A text dataset's entry (``vocab_size``, ``seq_len``, ``stride``, ``tokenizer``, ``subset``):
    loaded once (tokenised and cached on disk) to count its sequences and check the options."""
    n_errors = checker.reported
    for key, why in TEXT_NOT_APPLICABLE.items():
        if entry.get(key):
            checker.error(f"{path}.{key}", f"does not apply to the text dataset '{source.name}': {why}; remove it")
    options = {k: v for k, v in entry.items() if k not in DATASET_KEYS}
    unknown = sorted(set(options) - set(source.options))
    if unknown:
        valid = ", ".join((*DATASET_KEYS, *source.options))
        checker.error(f"{path}.{unknown[0]}", f"unknown option for dataset '{source.name}'; valid: {valid}")
    missing = checker.attempt(path, source.missing_files, None)
    if missing:
        checker.error(
            path,
            f"dataset '{source.name}' cannot be loaded: missing {', '.join(missing)} under "
            f"the data root {data_root()} (set PRUNELAB_DATA to the folder holding them, or "
            f"run `prunelab data fetch {source.name}`)",
        )
    if checker.reported > n_errors or missing is None:
        return None
    sizes = checker.attempt(path, _text_sizes, source.name, options)
    if sizes is None:
        return None
    subset = entry.get("subset")
    if subset is not None:
        if not isinstance(subset, dict) or not set(subset) <= {"n_train", "n_test", "n_val"}:
            checker.error(
                f"{path}.subset", f"must be a mapping with n_train, n_test and/or n_val (sequences); got {subset!r}"
            )
            return None
        for key in ("n_train", "n_test", "n_val"):
            if (
                key in subset
                and checker.number(f"{path}.subset.{key}", subset[key], low=1, high=sizes[key], integer=True) is None
            ):
                return None
    seq_len = sizes["seq_len"]
    return {
        "config": {"name": source.name, "options": options, "subset": subset, "validation": 0, "standardize": False},
        "input_shape": (seq_len,),
        "n_classes": sizes["vocab_size"],
        "n_train": (subset or {}).get("n_train", sizes["n_train"]),
        "has_val": True,
        "dry": {"example_inputs": token_example(seq_len)},
    }


def _text_sizes(name: str, options: dict) -> dict:
    """Sequences per split, vocabulary and sequence length of a text dataset (memoised per data root)."""
    from prunelab.data import cache_dir, load_dataset

    key = (name, repr(sorted(options.items())), str(data_root()), str(cache_dir()))
    if key not in _TEXT_SIZES:
        ds = load_dataset(name, **options)
        _TEXT_SIZES[key] = {
            "n_train": len(ds.x_train),
            "n_test": len(ds.x_test),
            "n_val": len(ds.x_val),
            "vocab_size": ds.vocab_size,
            "seq_len": ds.seq_len,
        }
    return _TEXT_SIZES[key]


def load_prepared_dataset(cfg: dict):
    from prunelab.data import load_dataset

    ds = load_dataset(cfg["name"], **cfg["options"])
    if cfg.get("subset"):
        n_val = {"n_val": cfg["subset"]["n_val"]} if "n_val" in cfg["subset"] else {}  # text datasets only
        ds = ds.subset(n_train=cfg["subset"].get("n_train"), n_test=cfg["subset"].get("n_test"), seed=0, **n_val)
    if cfg.get("validation"):
        ds = ds.with_validation(cfg["validation"], seed=0)
    if cfg.get("standardize"):
        ds = ds.standardized()
    return ds


# --------------------------------------------------------------- training
def prepare_training(path: str, training: dict, override: dict, checker: Checker) -> dict | None:
    n = checker.reported
    valid = (*TRAINING_DEFAULTS, *OPTIONAL_TRAINING, *OPTIONAL_TRAINING_STEPS, *LR_DROP_KEYS)
    checker.keys("training", training, valid)
    if not isinstance(override, dict):
        checker.error(f"{path}.training", f"must be a mapping; got {override!r}")
        return None
    checker.keys(f"{path}.training", override, valid)
    train = {**TRAINING_DEFAULTS, **training, **override}
    where = lambda key: f"{path}.training.{key}" if key in override else f"training.{key}"
    checker.number(where("epochs"), train["epochs"], low=0, integer=True)
    checker.number(where("finetune_epochs"), train["finetune_epochs"], low=0, integer=True)
    checker.number(where("batch_size"), train["batch_size"], low=1, integer=True)
    checker.number(where("lr"), train["lr"], low=0.0, closed="neither")
    if train["finetune_lr"] is not None:
        checker.number(where("finetune_lr"), train["finetune_lr"], low=0.0, closed="neither")
    checker.number(where("momentum"), train["momentum"], low=0.0, high=1.0, closed="left")
    checker.number(where("weight_decay"), train["weight_decay"], low=0.0)
    if train["retrain_tolerance"] is not None:
        checker.number(where("retrain_tolerance"), train["retrain_tolerance"], low=0.0, high=1.0)
    checker.number(where("eval_every"), train["eval_every"], low=1, integer=True)
    for key in OPTIONAL_TRAINING:
        if train.get(key) is not None:
            checker.number(where(key), train[key], low=1, integer=True)
        else:
            train.pop(key, None)
    for key in OPTIONAL_TRAINING_STEPS:
        steps = _step_list(where(key), train.get(key), checker)
        if steps:
            train[key] = steps
        else:
            train.pop(key, None)
    _lr_drop(train, where, checker)
    if train["optimizer"] not in OPTIMIZERS:
        checker.error(
            where("optimizer"),
            f"unknown optimizer {train['optimizer']!r}"
            f"{suggest(str(train['optimizer']), OPTIMIZERS)}; choose one of: {', '.join(OPTIMIZERS)}",
        )
    return None if checker.reported > n else train


def _lr_drop(train: dict, where, checker: Checker) -> None:
    """``lr_drop``: epochs e ≥ 1 after which the dense training's learning rate is multiplied by
    ``lr_drop_factor`` (in (0, 1); default 0.1), each ≤ ``epochs``; resolved (sorted) only when
    given, and the factor only with it."""
    drop = train.get("lr_drop")
    if drop is None or drop == []:
        if train.get("lr_drop_factor") is not None:
            checker.error(where("lr_drop_factor"), "applies only with 'lr_drop' (the epochs after which to drop)")
        train.pop("lr_drop", None)
        train.pop("lr_drop_factor", None)
        return
    if not isinstance(drop, list):
        checker.error(where("lr_drop"), f"must be a list of epochs such as [6, 8]; got {drop!r}")
        return
    epochs = train["epochs"] if isinstance(train["epochs"], int) and train["epochs"] >= 1 else None
    for i, e in enumerate(drop):
        checker.number(f"{where('lr_drop')}[{i}]", e, low=1, high=epochs, integer=True, param="lr_drop")
    train["lr_drop"] = sorted(drop) if all(isinstance(e, int) for e in drop) else drop
    train["lr_drop_factor"] = train.get("lr_drop_factor", 0.1)
    checker.number(where("lr_drop_factor"), train["lr_drop_factor"], low=0.0, high=1.0, closed="neither")


def _step_list(path: str, value, checker: Checker) -> list[int] | None:
    """A list of step counts ≥ 1 (``report_at_steps``), sorted, without repeats; None (or an empty
    list) for none."""
    if value is None:
        return None
    if not isinstance(value, list):
        checker.error(path, f"must be a list of step counts such as [510, 740]; got {value!r}")
        return None
    steps = [
        checker.number(f"{path}[{i}]", v, low=1, integer=True, param=path.rsplit(".", 1)[-1])
        for i, v in enumerate(value)
    ]
    if any(s is None for s in steps):
        return None
    return sorted({int(s) for s in steps if s is not None})


def finetune_step_count(train: dict, per_epoch: int) -> int:
    """The fine-tuning phase's optimiser steps: ``finetune_epochs`` epochs, at most ``finetune_steps``."""
    steps = train["finetune_epochs"] * per_epoch
    return min(steps, train["finetune_steps"]) if train.get("finetune_steps") else steps


def _switch_or_mapping(path: str, value, checker: Checker, accepted: str) -> dict | None:
    """An option written ``true`` (its defaults: ``{}``), ``false``/null (off: None) or a mapping;
    anything else is an error naming what is ``accepted`` (None)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        checker.error(path, f"must be {accepted}; got {value!r}")
        return None
    return value


def prepare_distill(path: str, value, train: dict, checker: Checker) -> dict | None:
    """A method's ``distill``: ``true`` (the defaults), ``false``/null (none) or a mapping with
    ``weight`` in [0, 1] and ``temperature`` > 0; resolved with the defaults filled in."""
    value = _switch_or_mapping(path, value, checker, "true or a mapping {weight: 0.5, temperature: 2.0}")
    if value is None:
        return None
    checker.keys(path, value, tuple(DISTILL_DEFAULTS))
    distill = {**DISTILL_DEFAULTS, **value}
    checker.number(f"{path}.weight", distill["weight"], low=0.0, high=1.0, param="distill_weight")
    checker.number(f"{path}.temperature", distill["temperature"], low=0.0, closed="neither", param="temperature")
    if not train["finetune_epochs"]:
        checker.error(
            path,
            "distils from the dense model during fine-tuning, but training.finetune_epochs is 0; "
            "give the fine-tuning phase some epochs or remove 'distill'",
        )
    return distill


def prepare_latency(
    path: str,
    value,
    checker: Checker,
    defaults: dict = LATENCY_DEFAULTS,
    accepted: str = "true or a mapping {batch_sizes: [1, 64], min_sparsity: 0.5, threads: 1, rounds: 5}",
) -> dict | None:
    """A method's ``latency``: ``true`` (the ``defaults``), ``false``/null (none) or a mapping of
    the ``defaults``' keys: ``batch_sizes`` (a list of ints ≥ 1), ``min_sparsity`` in [0, 1] (where
    the task has it), ``threads`` ≥ 1, ``rounds`` ≥ 1. ``accepted`` is the message's "must be ..."."""
    value = _switch_or_mapping(path, value, checker, accepted)
    if value is None:
        return None
    checker.keys(path, value, tuple(defaults))
    latency = {**defaults, **value}
    sizes = latency["batch_sizes"]
    if not isinstance(sizes, list) or not sizes:
        checker.error(f"{path}.batch_sizes", f"must be a non-empty list of batch sizes; got {sizes!r}")
    else:
        for i, size in enumerate(sizes):
            checker.number(f"{path}.batch_sizes[{i}]", size, low=1, integer=True, param="batch_sizes")
    if "min_sparsity" in defaults:
        checker.number(f"{path}.min_sparsity", latency["min_sparsity"], low=0.0, high=1.0)
    checker.number(f"{path}.threads", latency["threads"], low=1, integer=True)
    checker.number(f"{path}.rounds", latency["rounds"], low=1, integer=True)
    return latency


# ---------------------------------------------------------------- running
class _Snapshot(Callback):
    """Keeps a copy of the parameters after training step ``k`` (lottery-ticket rewinding)."""

    def __init__(self, k: int):
        self.k = k
        self.state: dict | None = None

    def on_train_begin(self, state):
        if self.k == 0:
            self.state = _params(state.model)

    def on_step_end(self, state):
        if state.step == self.k and self.state is None:
            self.state = _params(state.model)


class EarlyStopping(Callback):
    """Stops training once the validation loss (a language model's log perplexity) has not improved
    for ``patience`` epochs; :meth:`restore` puts back the weights of the best epoch."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best = float("inf")
        self.state: dict | None = None
        self.waited = 0

    def on_epoch_end(self, state):
        loss = state.history[-1].get("val_loss") if state.history else None
        if loss is None or loss != loss:
            return
        if loss < self.best:
            self.best, self.waited = loss, 0
            self.state = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        else:
            self.waited += 1
            state.stop = self.waited >= self.patience

    def restore(self, model) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_kwargs(train: dict, method: dict, *, finetune: bool) -> dict:
    lr = train["finetune_lr"] if finetune and train["finetune_lr"] is not None else train["lr"]
    kwargs = dict(
        batch_size=train["batch_size"],
        lr=lr,
        optimizer=train["optimizer"],
        momentum=train["momentum"],
        weight_decay=train["weight_decay"],
        progress=False,
    )
    if not finetune and train.get("lr_drop"):  # the dense training's step decay
        kwargs.update(lr_drop=train["lr_drop"], lr_drop_factor=train["lr_drop_factor"])
    if method.get("regularizer"):
        kwargs.update(regularizer=method["regularizer"]["name"], reg_strength=method["regularizer"]["strength"])
        extra = {k: v for k, v in method["regularizer"].items() if k not in ("name", "strength")}
        if extra:
            kwargs["regularizer"] = {"name": method["regularizer"]["name"], **extra}
    return kwargs


def dense_model(config: dict, ds, cache_dir: str | None, callbacks=(), force: bool = False):
    """The trained dense model (and the rewind snapshot, if the method asks for one),
    from the cache when another run of the study already trained it. ``force`` trains even
    on a cache hit (with ``callbacks`` watching the training, e.g. pruning probes on copies,
    which leave the trained model as it would be without them) and refreshes the cache."""
    train, method, seed = config["training"], config["method"], config["seed"]
    rewind = method.get("rewind")
    path = dense_cache_path(config, cache_dir)
    model = build_model(config["model"]["name"], dataset=ds, seed=seed, **config["model"]["options"])
    saved = None if force else load_dense(path, model)
    if saved is not None:
        return model, saved["history"], saved.get("snapshot"), True
    snapshot = _Snapshot(0 if rewind == "init" else rewind) if rewind is not None else None
    stopper = EarlyStopping(train["patience"]) if train.get("patience") else None
    history = fit(
        model,
        ds,
        epochs=train["epochs"],
        seed=seed,
        callbacks=[*([snapshot] if snapshot else []), *([stopper] if stopper else []), *callbacks],
        **train_kwargs(train, method, finetune=False),
    )
    if stopper is not None:
        stopper.restore(model)
    save_dense(path, model, history, snapshot.state if snapshot else None)
    return model, history, snapshot.state if snapshot else None, False


def dense_cache_path(config: dict, cache_dir: str | None) -> Path | None:
    """Where the trained dense model of ``config`` is cached (None without a cache folder)."""
    train, method = config["training"], config["method"]
    key_fields = {
        "dataset": config["dataset"],
        "model": config["model"],
        "seed": config["seed"],
        "dense": {k: train[k] for k in (*DENSE_KEYS, "patience", *LR_DROP_KEYS) if k in train},
        "regularizer": method.get("regularizer"),
        "layers": method.get("layers"),
        "rewind": method.get("rewind"),
        "version": DENSE_VERSION,
    }
    return Path(cache_dir) / "dense" / f"{digest(key_fields, 20)}.pt" if cache_dir else None


def load_dense(path: Path | None, model) -> dict | None:
    """Load the cached dense weights at ``path`` into ``model`` and return the cache entry
    (``history``, ``snapshot``); None when there is no such file."""
    if path is None:
        return None
    try:  # O_NOFOLLOW: a symlink planted at the cache's name is not read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        saved = torch.load(f, weights_only=True, map_location="cpu")
    model.load_state_dict(saved["state_dict"])
    return saved


def save_dense(path: Path | None, model, history, snapshot) -> None:
    """Write a trained dense model to the cache, atomically; a folder that cannot be written
    (a remote Ray node) is skipped: the cache is an optimisation."""
    if path is None:
        return
    from prunelab._files import exclusive_temp

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = exclusive_temp(path)  # a fresh file: never a planted file or symlink
        with os.fdopen(fd, "wb") as f:
            torch.save({"state_dict": model.state_dict(), "history": history, "snapshot": snapshot}, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError):  # torch.save reports a full disk as a RuntimeError
        if tmp is not None:
            try:
                tmp.unlink()  # a full disk leaves a partial file: do not keep it
            except OSError:
                pass


def distill_kwargs(method: dict, dense) -> dict:
    """fit's distillation arguments for a method with ``distill`` (a copy of ``dense`` as the teacher)."""
    distill = method.get("distill")
    if not distill:
        return {}
    return {
        "distill_from": copy.deepcopy(dense),
        "distill_weight": distill["weight"],
        "temperature": distill["temperature"],
    }


_TEXT_SIZES: dict[tuple, dict] = {}


def prepare_entries(
    dataset: tuple[str, dict],
    model: tuple[str, dict],
    method: tuple[str, dict],
    training: dict,
    checker: Checker,
    keys: tuple[str, ...],
    *,
    step_reports: bool = False,
) -> tuple[dict | None, dict | None, dict]:
    """The start a task's ``prepare`` shares with the others: the method's keys checked against
    ``keys``, the dataset and the training budget (the method's own ``training:`` over the study's)
    prepared, the model's ``name`` required. Returns ``(data, train, options)`` (the model's options
    without ``name`` and ``label``); ``data`` or ``train`` is None when it has errors, and a missing
    ``name`` is reported (compare ``checker.reported`` before and after).
    ``step_reports``: the task records the accuracies at ``training.report_at_steps`` (the prune
    task); any other task refuses those keys."""
    (d_path, d_entry), (m_path, m_entry), (x_path, x_entry) = dataset, model, method
    checker.keys(x_path, x_entry, keys)
    data = prepare_dataset(d_path, d_entry, checker)
    train = prepare_training(x_path, training, x_entry.get("training") or {}, checker)
    if "name" not in m_entry:
        checker.error(m_path, "missing 'name'")
    if train is not None and not step_reports:
        for key in OPTIONAL_TRAINING_STEPS:
            if key in train:
                checker.error(x_path, f"'training.{key}' applies to the prune task only; remove it for this method")
    return data, train, {k: v for k, v in m_entry.items() if k not in ("name", "label")}
