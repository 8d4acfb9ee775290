"""The ``prune`` task: train a model, prune it with one method, fine-tune, measure.

One run = (dataset, model, method, sparsity, seed):

1. train the dense model ``training.epochs`` epochs (with the method's regulariser,
   if any) — cached per (dataset, model, seed, dense budget, regulariser), so the
   many methods and sparsities of a study share one dense model per seed;
2. build the Pruner (criterion, granularity, scope, schedule to ``sparsity``),
   apply the events due at step 0 and measure ``accuracy_pruned``;
3. train ``training.finetune_epochs`` epochs with the Pruner attached (iterative
   and gradual schedules prune during this phase; masks stay enforced), with the
   method's ``distill: {weight, temperature}`` distilling from the dense model of step 1;
4. measure test accuracy and the model's size (``prunelab.summary``).

Language models (``gpt``, ``lstm-lm``) on a text dataset (``dataset: {name: pydocs, vocab_size: 4096,
seq_len: 64}``) run the same steps: accuracy is token accuracy, and the records also hold test
``perplexity`` (dense, right after pruning and final) and ``val_perplexity`` (the text's own valid
split). ``training.patience`` (optional) stops dense training when the validation loss has not
improved for that many epochs and keeps the best epoch's weights.

Schedule timing may be written in epochs (``start_epochs``, ``every_epochs``,
``at_epochs``); it is resolved into optimiser steps of the fine-tuning phase.
"""

from __future__ import annotations

import copy
import os
import stat
import time
from pathlib import Path

import torch

from prunelab._validation import suggest
from prunelab.data import DATASETS, data_root, dry_run_inputs, takes_token_ids
from prunelab.data.examples import token_example
from prunelab.experiments.limits import build_bounded
from prunelab.experiments.store import digest
from prunelab.experiments.tasks import TASKS, Checker, Task
from prunelab.models import build_model
from prunelab.pruning import Pruner, make_regularizer, make_schedule
from prunelab.pruning.targets import resolve_targets
from prunelab.training import OPTIMIZERS, Callback, RecoveryMonitor, evaluate, fit, steps_per_epoch

DATASET_KEYS = ("name", "label", "subset", "validation", "standardize", "training")
MODEL_KEYS = ("name", "label")
METHOD_KEYS = (
    "label",
    "criterion",
    "granularity",
    "scope",
    "schedule",
    "reduction",
    "min_keep",
    "regularizer",
    "rewind",
    "layers",
    "calibration",
    "training",
    "thin",
    "distill",
    "latency",
)
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
METHOD_DEFAULTS = {
    "criterion": "magnitude",
    "granularity": "weight",
    "scope": "local",
    "schedule": "one-shot",
    "reduction": "l2",
    "min_keep": 1,
    "regularizer": None,
    "rewind": None,
    "layers": None,
    "calibration": 1024,
}
EPOCH_KEYS = {"start_epochs": "start", "every_epochs": "every", "at_epochs": "at"}
DISTILL_DEFAULTS = {"weight": 0.5, "temperature": 2.0}
LATENCY_DEFAULTS = {"batch_sizes": [1, 64], "min_sparsity": 0.5, "threads": 1, "rounds": 5}
DENSE_KEYS = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay")
OPTIONAL_TRAINING = ("patience", "finetune_steps")  # resolved only when given, so older runs keep their ids
HISTOGRAM_BINS = 80
VERSION = 1  # bump when the meaning of a run changes, so old results are not reused


@TASKS.register("prune")
class PruneTask(Task):
    name = "prune"
    metrics = (
        "accuracy",
        "loss",
        "accuracy_dense",
        "accuracy_pruned",
        "sparsity",
        "compression",
        "speedup",
        "params",
        "nonzero_params",
        "flops_dense",
        "flops",
        "bytes_dense",
        "bytes_bitmask",
        "bytes_csr",
        "bytes_best",
        "train_seconds",
        "units_removed",
        "params_thinned",
        "accuracy_thinned",
        "measured_speedup",
        "retrain_steps",
        "hessian_seconds",
        "solve_seconds",
        "val_accuracy",
        "val_accuracy_dense",
        "perplexity",
        "perplexity_dense",
        "perplexity_pruned",
        "val_perplexity",
        "val_perplexity_dense",
        "tokens",
        "dense_best_epoch",
        "dense_epochs",
        "latency_ms_b<B>",
        "latency_sparse_ms_b<B>",
        "sparse_speedup_b<B>",
    )

    def default_label(self, method: dict) -> str:
        schedule = method.get("schedule", "one-shot")
        schedule = schedule.get("name", "?") if isinstance(schedule, dict) else schedule
        parts = [str(method.get("criterion", "magnitude")), str(schedule)]
        for key in ("granularity", "scope"):
            if key in method and method[key] != METHOD_DEFAULTS[key]:
                parts.append(str(method[key]))
        regularizer = method.get("regularizer")
        if regularizer:
            parts.append(regularizer.get("name", "?") if isinstance(regularizer, dict) else str(regularizer))
        return "/".join(parts)

    # ------------------------------------------------------------ planning
    def prepare(self, *, dataset, model, method, training, checker: Checker, sparsities):
        n_errors = len(checker.errors)
        d_path, d_entry = dataset
        m_path, m_entry = model
        x_path, x_entry = method
        data = _prepare_dataset(d_path, d_entry, checker)
        x_entry = dict(x_entry)
        checker.keys(x_path, x_entry, METHOD_KEYS)
        train = _prepare_training(x_path, training, x_entry.pop("training", None) or {}, checker)
        if data is None or train is None or len(checker.errors) > n_errors:
            return None
        options = {k: v for k, v in m_entry.items() if k not in MODEL_KEYS}
        if "name" not in m_entry:
            checker.error(m_path, "missing 'name'")
            return None
        net = checker.attempt(
            m_path,
            build_bounded,
            m_entry["name"],
            input_shape=data["input_shape"],
            n_classes=data["n_classes"],
            **options,
        )
        if net is None:
            return None
        resolved = {"model": {"name": net.config["name"], "options": options}}
        per_epoch = steps_per_epoch(data["n_train"], train["batch_size"])
        if train.get("patience") is not None and not data["has_val"]:
            checker.error(
                f"{x_path}.training.patience" if "patience" in (x_entry.get("training") or {}) else "training.patience",
                "stops on the validation loss, but the dataset has no "
                "validation split; give the dataset a 'validation' size or remove 'patience'",
            )
            return None
        m = _prepare_method(x_path, x_entry, net, per_epoch, train, sparsities, checker, dry=data["dry"])
        if m is None:
            return None
        resolved.update(dataset=data["config"], method=m, training=train)
        sizes = {t.name: t.weight.numel() for t in resolve_targets(net, m["layers"])}
        module_of = {t.name: t.module_name for t in resolve_targets(net, m["layers"])}
        return {"config": resolved, "sizes": sizes, "modules": module_of}

    def resolve(self, prepared, *, sparsity, seed):
        config = copy.deepcopy(prepared["config"])
        schedule = config["method"]["schedule"]
        schedule["sparsity"] = self.level(prepared, sparsity)  # the cap, for fixed-fraction
        if isinstance(sparsity, dict):
            config["method"]["layer_sparsity"] = dict(sparsity)
        return {"task": self.name, "version": VERSION, **config, "sparsity": sparsity, "seed": seed}

    def level(self, prepared, sparsity):
        if not isinstance(sparsity, dict):
            return float(sparsity)
        sizes, modules = prepared["sizes"], prepared["modules"]
        targets = {name: sparsity.get(name, sparsity.get(modules[name], 0.0)) for name in sizes}
        return round(sum(targets[n] * sizes[n] for n in sizes) / sum(sizes.values()), 6)

    # ------------------------------------------------------------ running
    def run(self, config: dict, context: dict) -> dict:
        return execute_prune(config, context.get("cache_dir"))


# ---------------------------------------------------------------- dataset
def _prepare_dataset(path: str, entry: dict, checker: Checker) -> dict | None:
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
_TEXT_SIZES: dict[tuple, dict] = {}


def _prepare_text_dataset(path: str, entry: dict, source, checker: Checker) -> dict | None:
    """A text dataset's entry (``vocab_size``, ``seq_len``, ``stride``, ``tokenizer``, ``subset``):
    loaded once (tokenised and cached on disk) to count its sequences and check the options."""
    n_errors = len(checker.errors)
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
    if len(checker.errors) > n_errors or missing is None:
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
def _prepare_training(path: str, training: dict, override: dict, checker: Checker) -> dict | None:
    n = len(checker.errors)
    valid = (*TRAINING_DEFAULTS, *OPTIONAL_TRAINING)
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
    if train["optimizer"] not in OPTIMIZERS:
        checker.error(
            where("optimizer"),
            f"unknown optimizer {train['optimizer']!r}"
            f"{suggest(str(train['optimizer']), OPTIMIZERS)}; choose one of: {', '.join(OPTIMIZERS)}",
        )
    return None if len(checker.errors) > n else train


def finetune_step_count(train: dict, per_epoch: int) -> int:
    """The fine-tuning phase's optimiser steps: ``finetune_epochs`` epochs, at most ``finetune_steps``."""
    steps = train["finetune_epochs"] * per_epoch
    return min(steps, train["finetune_steps"]) if train.get("finetune_steps") else steps


# ----------------------------------------------------------------- method
def _default_scope(method: dict) -> str:
    """A criterion's own scope when the spec names none (Wanda: ``row``, for granularities whose
    groups lie in one row); ``local`` otherwise, so that other methods keep their run ids."""
    from prunelab.pruning import CRITERIA

    criterion = method["criterion"]
    name = criterion.get("name") if isinstance(criterion, dict) else criterion
    try:
        preferred = getattr(CRITERIA.get(name), "default_scope", "local")
    except (TypeError, ValueError):
        return METHOD_DEFAULTS["scope"]  # an unknown criterion is reported where it is checked
    if preferred == "row" and method["granularity"] in ("filter", "unit", "channel"):
        return METHOD_DEFAULTS["scope"]
    return preferred


def _prepare_method(
    path: str,
    entry: dict,
    net,
    per_epoch: int,
    train: dict,
    sparsities: list[float],
    checker: Checker,
    dry: dict | None = None,
) -> dict | None:
    n = len(checker.errors)
    method = {**METHOD_DEFAULTS, **{k: v for k, v in entry.items() if k != "label"}}
    if "scope" not in entry:
        method["scope"] = _default_scope(method)
    schedule = method["schedule"]
    schedule = dict(schedule) if isinstance(schedule, dict) else {"name": schedule}
    if not isinstance(schedule.get("name"), str):
        checker.error(f"{path}.schedule", f"must be a schedule name or a mapping with 'name'; got {schedule!r}")
        return None
    for key, target in EPOCH_KEYS.items():
        if key in schedule:
            if target in schedule:
                checker.error(f"{path}.schedule.{key}", f"give either {key} (epochs) or {target} (steps), not both")
                continue
            epochs = checker.number(f"{path}.schedule.{key}", schedule.pop(key), low=0.0)
            if epochs is not None:
                schedule[target] = max(1 if target == "every" else 0, round(epochs * per_epoch))
    if "sparsity" in schedule:
        checker.error(f"{path}.schedule.sparsity", "comes from the study's 'sparsities' list; remove it here")
        schedule.pop("sparsity")
    method["schedule"] = schedule
    floats = [s for s in sparsities if not isinstance(s, dict)]
    if not _nm_levels_fit(path, method["granularity"], sparsities, checker):
        return None
    sparsity = max(floats) if floats else 0.5
    schedule_args = {k: v for k, v in schedule.items() if k != "name"}
    built = checker.attempt(
        f"{path}.schedule",
        make_schedule,
        schedule["name"],
        None if schedule["name"] in ("fixed-fraction", "fixed_fraction") else sparsity,
        **schedule_args,
    )
    if built is not None:
        finetune_steps = finetune_step_count(train, per_epoch)
        if built.last_step > finetune_steps:
            capped = (
                ", capped by training.finetune_steps" if finetune_steps < train["finetune_epochs"] * per_epoch else ""
            )
            checker.error(
                f"{path}.schedule",
                f"its last prune is at step {built.last_step}, after the "
                f"{finetune_steps} fine-tuning steps ({train['finetune_epochs']} epochs x "
                f"{per_epoch} steps{capped}); raise training.finetune_epochs or shorten the schedule",
            )
        schedule["name"] = built.name
    if "thin" in method:  # only when given, so that older runs keep their ids
        if not isinstance(method["thin"], bool):
            checker.error(f"{path}.thin", f"must be true or false; got {method['thin']!r}")
        elif not method["thin"]:
            method.pop("thin")
        else:
            from prunelab.units import Units

            example = (dry or {}).get("example_inputs")  # token ids for a language model
            checker.attempt(f"{path}.thin", Units.of, net, None, example)
    if "distill" in method:  # only when given, so that older runs keep their ids
        distill = _prepare_distill(f"{path}.distill", method["distill"], train, checker)
        if distill is None:
            method.pop("distill")
        else:
            method["distill"] = distill
    if "latency" in method:  # only when given, so that older runs keep their ids
        latency = prepare_latency(f"{path}.latency", method["latency"], checker)
        if latency is None:
            method.pop("latency")
        else:
            method["latency"] = latency
    rewind = method["rewind"]
    dense_steps = train["epochs"] * per_epoch
    if rewind is not None and rewind != "init":
        if checker.number(f"{path}.rewind", rewind, low=0, high=dense_steps, integer=True) is None:
            return None
    pruner_rewind = None if rewind is None else "init"
    checker.attempt(
        path,
        Pruner,
        net,
        sparsity if built is None else None,
        criterion=method["criterion"],
        granularity=method["granularity"],
        scope=method["scope"],
        schedule=built if built is not None else "one-shot",
        layers=method["layers"],
        reduction=method["reduction"],
        min_keep=method["min_keep"],
        rewind=pruner_rewind,
    )
    for i, level in enumerate(sparsities):  # per-layer targets: every layer named, none unknown
        if isinstance(level, dict):
            checker.attempt(
                f"{path} with sparsities[{i}]",
                Pruner,
                net,
                level,
                criterion=method["criterion"],
                granularity=method["granularity"],
                scope=method["scope"],
                layers=method["layers"],
                reduction=method["reduction"],
            )
    regularizer = method["regularizer"]
    if regularizer is not None:
        if isinstance(regularizer, str):
            regularizer = {"name": regularizer}
        if not isinstance(regularizer, dict) or "strength" not in regularizer:
            checker.error(f"{path}.regularizer", f"must be a mapping {{name, strength}}; got {regularizer!r}")
        else:
            reg = checker.attempt(f"{path}.regularizer", make_regularizer, regularizer)
            if reg is not None:
                checker.attempt(f"{path}.regularizer", reg.bind, resolve_targets(net, method["layers"]))
        method["regularizer"] = regularizer
    checker.number(f"{path}.calibration", method["calibration"], low=1, integer=True)
    if isinstance(method["criterion"], dict):
        method["criterion"] = dict(method["criterion"])
    return None if len(checker.errors) > n else method


def _nm_levels_fit(path: str, granularity, levels: list, checker: Checker) -> bool:
    """An N:M granularity (``"2:4"``) prunes every layer to ``1 − N/M``: the method's levels must be
    exactly that (``sparsities: [0.5]`` for 2:4 and 4:8)."""
    from prunelab.pruning.granularity import parse_nm

    nm = parse_nm(granularity)
    if nm is None or not 0 < nm[0] < nm[1]:
        return True  # not N:M (or a bad one: reported where the Pruner is built)
    fixed = 1 - nm[0] / nm[1]
    wrong = [level for level in levels if isinstance(level, dict) or abs(level - fixed) > 1e-9]
    if wrong:
        checker.error(
            f"{path}.granularity",
            f"{granularity!r} prunes every layer to {fixed:g} (at most {nm[0]} of "
            f"every {nm[1]} inputs), so its only level is {fixed:g}; give this "
            f"method sparsities: [{fixed:g}] (got {wrong[0]!r})",
        )
    return not wrong


def _prepare_distill(path: str, value, train: dict, checker: Checker) -> dict | None:
    """A method's ``distill``: ``true`` (the defaults), ``false``/null (none) or a mapping with
    ``weight`` in [0, 1] and ``temperature`` > 0; resolved with the defaults filled in."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        checker.error(path, f"must be true or a mapping {{weight: 0.5, temperature: 2.0}}; got {value!r}")
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
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        checker.error(path, f"must be {accepted}; got {value!r}")
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


class _EarlyStopping(Callback):
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


def _train_kwargs(train: dict, method: dict, *, finetune: bool) -> dict:
    lr = train["finetune_lr"] if finetune and train["finetune_lr"] is not None else train["lr"]
    kwargs = dict(
        batch_size=train["batch_size"],
        lr=lr,
        optimizer=train["optimizer"],
        momentum=train["momentum"],
        weight_decay=train["weight_decay"],
        progress=False,
    )
    if method.get("regularizer"):
        kwargs.update(regularizer=method["regularizer"]["name"], reg_strength=method["regularizer"]["strength"])
        extra = {k: v for k, v in method["regularizer"].items() if k not in ("name", "strength")}
        if extra:
            kwargs["regularizer"] = {"name": method["regularizer"]["name"], **extra}
    return kwargs


def _dense_model(config: dict, ds, cache_dir: str | None, callbacks=(), force: bool = False):
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
    stopper = _EarlyStopping(train["patience"]) if train.get("patience") else None
    history = fit(
        model,
        ds,
        epochs=train["epochs"],
        seed=seed,
        callbacks=[*([snapshot] if snapshot else []), *([stopper] if stopper else []), *callbacks],
        **_train_kwargs(train, method, finetune=False),
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
        "dense": {k: train[k] for k in (*DENSE_KEYS, "patience") if k in train},
        "regularizer": method.get("regularizer"),
        "layers": method.get("layers"),
        "rewind": method.get("rewind"),
        "version": VERSION,
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


def _distill_kwargs(method: dict, dense) -> dict:
    """fit's distillation arguments for a method with ``distill`` (a copy of ``dense`` as the teacher)."""
    distill = method.get("distill")
    if not distill:
        return {}
    return {
        "distill_from": copy.deepcopy(dense),
        "distill_weight": distill["weight"],
        "temperature": distill["temperature"],
    }


def execute_prune(config: dict, cache_dir: str | None = None) -> dict:
    started = time.perf_counter()
    ds = load_prepared_dataset(config["dataset"])
    method, train, seed = config["method"], config["training"], config["seed"]
    model, dense_history, snapshot, cached = _dense_model(config, ds, cache_dir)
    test = (ds.x_test, ds.y_test)
    dense = evaluate(model, test)
    accuracy_dense = dense["accuracy"]
    lm = dense_language_model_metrics(model, ds, train, dense, dense_history) if takes_token_ids(ds) else None
    distill = _distill_kwargs(method, model)  # the teacher: the dense model, copied before pruning
    pruner = make_pruner(config, model, ds, snapshot)
    pruner.update()
    pruned = evaluate(model, test)
    accuracy_pruned = pruned["accuracy"]
    if lm is not None:
        lm["perplexity_pruned"] = pruned["perplexity"]
    monitor = None
    if train["retrain_tolerance"] is not None:  # steps until back within tolerance of the dense accuracy
        monitor = RecoveryMonitor(
            test, accuracy_dense, train["retrain_tolerance"], train["eval_every"], start=pruner.schedule.last_step
        )  # counted from the last prune
    history = (
        fit(
            model,
            ds,
            epochs=train["finetune_epochs"],
            seed=seed,
            pruner=pruner,
            callbacks=[monitor] if monitor else (),
            **distill,
            max_steps=train.get("finetune_steps"),
            **_train_kwargs(train, method, finetune=True),
        )
        if train["finetune_epochs"]
        else []
    )
    metrics = prune_metrics(
        model,
        pruner,
        ds,
        started=started,
        accuracy_dense=accuracy_dense,
        thin=bool(method.get("thin")),
        latency=method.get("latency"),
        accuracy_pruned=accuracy_pruned,
        cached=cached,
        dense_history=dense_history,
        monitor=monitor,
        language_model=lm,
    )
    if train.get("patience") and metrics.get("val_accuracy_dense") is not None:  # the epoch kept, not the last
        best = min((h for h in dense_history if "val_loss" in h), key=lambda h: h["val_loss"])
        metrics["val_accuracy_dense"] = best["val_accuracy"]
    return {
        "metrics": metrics,
        "curve": [{"phase": "dense", **h} for h in dense_history] + [{"phase": "prune", **h} for h in history],
    }


def make_pruner(config: dict, model, ds, snapshot=None) -> Pruner:
    """The Pruner of a prune run's config, on ``model``, calibrated on the first training images."""
    method = config["method"]
    schedule_args = {k: v for k, v in method["schedule"].items() if k != "name"}
    sparsity = method.get("layer_sparsity") or schedule_args.get("sparsity")
    if method["schedule"]["name"] != "fixed-fraction":
        schedule_args.pop("sparsity", None)  # from `sparsity` (per-layer targets: their overall)
    n_cal = min(method["calibration"], len(ds.y_train))
    return Pruner(
        model,
        sparsity,
        criterion=method["criterion"],
        granularity=method["granularity"],
        scope=method["scope"],
        schedule=method["schedule"]["name"],
        schedule_args=schedule_args,
        layers=method["layers"],
        reduction=method["reduction"],
        min_keep=method["min_keep"],
        rewind=snapshot,
        seed=config["seed"],
        calibration=(ds.x_train[:n_cal], ds.y_train[:n_cal]),
    )


def thinned_metrics(model, ds) -> dict:
    """Thin ``model`` physically (remove every unit whose incoming weights are all zero, its
    constant output folded into the next layer's bias: ``prunelab.units.thin_dead_units``) and
    measure it: ``units_removed``, ``params_thinned``, ``accuracy_thinned`` (equal to the masked
    model's up to float rounding) and ``measured_speedup``, the masked model's median forward
    latency at batch 64 over the thinned model's (``prunelab.measure_latency``)."""
    from prunelab.metrics import measure_latency
    from prunelab.units import thin_dead_units

    dry = dry_run_inputs(ds)
    small, plan = thin_dead_units(model, **dry)
    before, after = (
        measure_latency(m, batch_sizes=64, warmup=5, repeats=30, **dry)[0].median_ms for m in (model, small)
    )
    return {
        "units_removed": sum(len(v) for v in plan.values()),
        "params_thinned": sum(p.numel() for p in small.parameters()),
        "accuracy_thinned": evaluate(small, (ds.x_test, ds.y_test))["accuracy"],
        "measured_speedup": before / after,
    }


def latency_metrics(model, ds, options: dict) -> dict:
    """Measured forward latency of the final model (``prunelab.inference_latency``, median ms over
    ``rounds`` interleaved rounds): ``latency_ms_b<B>`` as it is (zeros stored and multiplied: the
    dense model's cost), ``latency_sparse_ms_b<B>`` with every Linear at ``min_sparsity`` or more as
    a CSR ``SparseLinear``, their ratio ``sparse_speedup_b<B>``, and the full result under ``latency``."""
    from prunelab.sparse import inference_latency

    result = inference_latency(
        model,
        **dry_run_inputs(ds),
        min_sparsity=options["min_sparsity"],
        batch_sizes=tuple(options["batch_sizes"]),
        threads=options["threads"],
        rounds=options["rounds"],
    )
    out = {"latency": result.to_dict()}
    for size in options["batch_sizes"]:
        out.update(
            {
                f"latency_ms_b{size}": result.median_ms["dense"][size],
                f"latency_sparse_ms_b{size}": result.median_ms["sparse"][size],
                f"sparse_speedup_b{size}": result.speedup("sparse", size),
            }
        )
    return out


def prune_metrics(
    model,
    pruner: Pruner,
    ds,
    *,
    started: float,
    accuracy_dense: float,
    accuracy_pruned: float,
    cached: bool,
    dense_history: list,
    monitor=None,
    thin: bool = False,
    language_model: dict | None = None,
    latency: dict | None = None,
) -> dict:
    """The metrics a prune run stores, from its final model and Pruner (with ``thin``, also
    those of :func:`thinned_metrics`; for a language model, also test ``perplexity`` and
    ``val_perplexity``, with the dense and just-pruned ones in ``language_model``)."""
    from prunelab.metrics import summary

    test = (ds.x_test, ds.y_test)
    final = evaluate(model, test)
    stats = summary(model, **dry_run_inputs(ds)).total
    weights = torch.cat([t.weight.detach().flatten() for t in pruner.targets])
    nonzero = weights[weights != 0]
    bound = float(nonzero.abs().max()) if len(nonzero) else 1.0
    counts = torch.histc(nonzero, bins=HISTOGRAM_BINS, min=-bound, max=bound)
    metrics = {
        "accuracy": final["accuracy"],
        "loss": final["loss"],
        "accuracy_dense": accuracy_dense,
        "accuracy_pruned": accuracy_pruned,
        "sparsity": stats.sparsity,
        "compression": stats.compression,
        "speedup": stats.speedup,
        "params": stats.params,
        "nonzero_params": stats.nonzero,
        "flops_dense": stats.flops_dense,
        "flops": stats.flops,
        "bytes_dense": stats.bytes_dense,
        "bytes_bitmask": stats.bytes_bitmask,
        "bytes_csr": stats.bytes_csr,
        "bytes_best": stats.bytes_best,
        "layer_sparsity": pruner.layer_sparsity(),
        "dense_cached": cached,
        # layers the no-empty-layer guard kept above their share (a SparsityShortfall), if any
        "held_layers": sorted({name for record in pruner.history for name in record.held}),
        "weight_histogram": {
            "edges": torch.linspace(-bound, bound, HISTOGRAM_BINS + 1).tolist(),
            "counts": [int(c) for c in counts.tolist()],
        },
        "train_seconds": time.perf_counter() - started,
    }
    if thin:
        metrics.update(thinned_metrics(model, ds))
    if latency:
        metrics.update(latency_metrics(model, ds, latency))
    if monitor is not None:
        metrics["retrain_steps"] = monitor.steps_to_recover
        metrics["retrain_curve"] = monitor.curve
    reports = [record.report for record in pruner.history if record.report is not None]
    if reports:
        metrics["hessian_seconds"] = sum(r.totals()["hessian_seconds"] for r in reports)
        metrics["solve_seconds"] = sum(r.totals()["solve_seconds"] for r in reports)
        metrics["layer_reports"] = [[row.as_dict() for row in r] for r in reports]
    if ds.x_val is not None:
        val = evaluate(model, (ds.x_val, ds.y_val))
        metrics["val_accuracy"] = val["accuracy"]
        metrics["val_accuracy_dense"] = next(
            (h["val_accuracy"] for h in reversed(dense_history) if "val_accuracy" in h), None
        )
        if "perplexity" in val:
            metrics["val_perplexity"] = val["perplexity"]
    if "perplexity" in final:
        metrics.update(perplexity=final["perplexity"], tokens=final["tokens"], **(language_model or {}))
    return metrics


def dense_language_model_metrics(model, ds, train: dict, test: dict, dense_history: list) -> dict:
    """A dense language model's perplexities before pruning (``test``: its evaluation on the test
    split; validation when the dataset has a validation split); with early stopping, the epoch it
    kept and the epochs it trained."""
    dense = {"perplexity_dense": test["perplexity"]}
    if ds.x_val is not None:
        dense["val_perplexity_dense"] = evaluate(model, (ds.x_val, ds.y_val))["perplexity"]
    if train.get("patience"):
        losses = [(h["val_loss"], i + 1) for i, h in enumerate(dense_history) if "val_loss" in h]
        if losses:
            dense.update(dense_best_epoch=min(losses)[1], dense_epochs=len(dense_history))
    return dense
