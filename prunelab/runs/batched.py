"""Prune runs of a study, many at once: the batched counterpart of
:func:`prunelab.runs.prune.execute_prune`, which the study planner
(:func:`prunelab.study.run.plan_jobs`) and the executors use for ``--engine batched``.

Runs that share dataset, model and training budget and differ only in seed, target, criterion,
granularity, scope, schedule or regulariser strength form a *group* (:func:`group_key`). Their
dense models are trained together (those not already in the study's dense cache), then every run
gets its own Pruner and all of them fine-tune together; each run's metrics come from the same
code as a single run's (:func:`~prunelab.runs.prune.prune_metrics`).
"""

from __future__ import annotations

import copy
import time

from prunelab.data import DATASETS
from prunelab.engine.batched import OPTIMIZERS, REGULARIZERS, BatchedModels, fit_batched, mlp_plan
from prunelab.models import build_model
from prunelab.runs.prepare import dense_cache_path, load_dense, load_prepared_dataset, save_dense
from prunelab.runs.prune import make_pruner, prune_metrics
from prunelab.store import digest
from prunelab.training import evaluate


def why_not_batched(config: dict) -> str | None:
    """Why a run cannot join a batch (None when it can)."""
    if config.get("task") != "prune":
        return f"task {config.get('task')!r} is not 'prune'"
    train, method = config["training"], config["method"]
    if train["optimizer"] not in OPTIMIZERS:
        return f"optimizer {train['optimizer']!r} (the engine has {', '.join(OPTIMIZERS)})"
    if train["weight_decay"]:
        return "weight decay (use regularizer l2)"
    if train["retrain_tolerance"] is not None:
        return "retrain_tolerance (recovery is monitored on one model at a time)"
    regularizer = method.get("regularizer")
    if regularizer and (regularizer["name"] not in REGULARIZERS or set(regularizer) - {"name", "strength"}):
        return f"regularizer {regularizer['name']!r} (the engine has {', '.join(REGULARIZERS)})"
    if method.get("rewind") is not None:
        return "rewinding"
    if method.get("distill"):
        return "distillation (the engine trains without a teacher)"
    if method.get("latency"):
        return "latency measurement (one model at a time)"
    if train.get("patience") is not None:
        return "early stopping (training.patience: each model stops at its own epoch)"
    if train.get("lr_drop"):
        return "a learning-rate drop (training.lr_drop; the engine trains at one rate)"
    if train.get("report_at_steps"):
        return "accuracies at given fine-tuning steps (training.report_at_steps; one model at a time)"
    if train.get("finetune_steps") is not None:
        return "a cap on the fine-tuning steps (training.finetune_steps)"
    name = config["dataset"]["name"]
    if name in DATASETS and hasattr(DATASETS.get(name), "token_streams"):
        return "a language model on a text dataset (the engine trains classifiers on images)"
    return None


def group_key(config: dict) -> str:
    """Runs with the same key can be trained as one batch."""
    regularizer = config["method"].get("regularizer")
    return digest(
        {
            "dataset": config["dataset"],
            "model": config["model"],
            "training": config["training"],
            "regularizer": regularizer["name"] if regularizer else None,
            "layers": config["method"].get("layers"),
        },
        16,
    )


def _strengths(configs: list[dict]) -> tuple[str | None, list[float] | None]:
    regularizers = [c["method"].get("regularizer") for c in configs]
    if not any(regularizers):
        return None, None
    return regularizers[0]["name"], [r["strength"] if r else 0.0 for r in regularizers]


def _dense_key(config: dict, cache_dir: str | None) -> str:
    path = dense_cache_path(config, cache_dir or ".")  # the cache's key, with or without a cache
    assert path is not None  # a cache folder gives a path
    return path.name


def _dense_models(configs: list[dict], ds, cache_dir: str | None):
    """Per config: (trained dense model, its history, whether it came from the cache); the
    models not in the cache are trained together."""
    train = configs[0]["training"]
    found: dict[str, tuple] = {}
    to_train: dict[str, dict] = {}
    for config in configs:
        key = _dense_key(config, cache_dir)
        if key in found or key in to_train:
            continue
        path = dense_cache_path(config, cache_dir)
        model = build_model(config["model"]["name"], dataset=ds, seed=config["seed"], **config["model"]["options"])
        saved = load_dense(path, model)
        if saved is not None:
            found[key] = (model, saved["history"], True)
        else:
            to_train[key] = {"config": config, "model": model, "path": path}
    if to_train:
        jobs = list(to_train.values())
        batch = BatchedModels([j["model"] for j in jobs])
        name, strengths = _strengths([j["config"] for j in jobs])
        histories = fit_batched(
            batch,
            ds,
            seeds=[j["config"]["seed"] for j in jobs],
            epochs=train["epochs"],
            batch_size=train["batch_size"],
            lr=train["lr"],
            optimizer=train["optimizer"],
            momentum=train["momentum"],
            regularizer=name,
            reg_strength=strengths,
            validation=_validation_split(ds),
        )
        for r, (key, job) in enumerate(to_train.items()):
            model = batch.member(r)
            save_dense(job["path"], model, histories[r], None)
            found[key] = (model, histories[r], False)
    out, seen = [], set()
    for config in configs:  # like single runs: a dense model another run trained counts as cached
        key = _dense_key(config, cache_dir)
        model, history, cached = found[key]
        out.append((model, history, cached or key in seen))
        seen.add(key)
    return out


def _validation_split(ds):
    """A run's validation split for the batched engine to evaluate after every epoch (None: the
    spec gave the dataset no validation size)."""
    return ds if ds.x_val is not None else None


def execute_prune_group(configs: list[dict], cache_dir: str | None = None) -> list[dict]:
    """Run a group of prune configs (same :func:`group_key`, each batchable) together; return
    each run's ``{"metrics", "curve"}`` as :func:`execute_prune` would."""
    if not configs:
        return []
    for config in configs:
        reason = why_not_batched(config)
        if reason is not None:
            raise ValueError(f"run cannot be batched: {reason}.")
    if len({group_key(c) for c in configs}) != 1:
        raise ValueError(
            "execute_prune_group needs runs of one group (same dataset, model, training, "
            "regulariser and layers); group them with group_key first."
        )
    started = time.perf_counter()
    ds = load_prepared_dataset(configs[0]["dataset"])
    test = (ds.x_test, ds.y_test)
    dense = _dense_models(configs, ds, cache_dir)
    models = [copy.deepcopy(model) for model, _, _ in dense]
    accuracy_dense = [evaluate(m, test)["accuracy"] for m in models]
    pruners = [make_pruner(c, m, ds) for c, m in zip(configs, models)]
    for pruner in pruners:
        pruner.update()
    accuracy_pruned = [evaluate(m, test)["accuracy"] for m in models]
    train = configs[0]["training"]
    histories: list[list[dict]] = [[] for _ in configs]
    batch = BatchedModels(models)
    if train["finetune_epochs"]:
        name, strengths = _strengths(configs)
        lr = train["finetune_lr"] if train["finetune_lr"] is not None else train["lr"]
        histories = fit_batched(
            batch,
            ds,
            seeds=[c["seed"] for c in configs],
            epochs=train["finetune_epochs"],
            batch_size=train["batch_size"],
            lr=lr,
            optimizer=train["optimizer"],
            momentum=train["momentum"],
            regularizer=name,
            reg_strength=strengths,
            pruners=pruners,
            validation=_validation_split(ds),
        )
    results = []
    for r, (config, pruner) in enumerate(zip(configs, pruners)):
        model = batch.store_member(r)
        _, dense_history, cached = dense[r]
        metrics = prune_metrics(
            model,
            pruner,
            ds,
            started=started,
            accuracy_dense=accuracy_dense[r],
            accuracy_pruned=accuracy_pruned[r],
            cached=cached,
            dense_history=dense_history,
            thin=bool(config["method"].get("thin")),
        )
        metrics["engine"] = "batched" if mlp_plan(model) is not None else "batched-vmap"
        results.append(
            {
                "metrics": metrics,
                "curve": [{"phase": "dense", **h} for h in dense_history]
                + [{"phase": "prune", **h} for h in histories[r]],
            }
        )
    return results
