"""The ``hashed`` task: HashedNets at the study's levels (Chen et al. 2015; STUDIES.md A).

One run = (dataset, model, sparsity, seed). The model is built with every Linear and Conv2d
layer hashed at compression ``1 − sparsity`` (:mod:`prunelab.models.hashed`; level 0 is the
ordinary dense model), so at each level it stores as many weights as a pruned model keeps, and is
trained from scratch for the whole budget of a prune run, ``epochs + finetune_epochs`` epochs at
``lr``. Recorded: accuracy, loss (and ``val_accuracy`` with a validation split), ``params`` (the
virtual model's), ``nonzero_params`` (the stored, non-zero ones: buckets and biases),
``sparsity`` (the fraction of virtual weights not stored), ``compression``, FLOPs (those of the
virtual layers: hashing saves memory, not arithmetic), storage bytes and the training curve.

In a spec::

    methods:
      - {label: HashedNet, task: hashed}
"""

from __future__ import annotations

import copy
import time

from prunelab.models import build_model
from prunelab.runs.limits import build_bounded
from prunelab.runs.prepare import load_prepared_dataset, prepare_entries, train_kwargs
from prunelab.runs.tasks import TASKS, Checker, Task
from prunelab.training import evaluate, fit

HASHED_KEYS = ("label", "training")
VERSION = 1


@TASKS.register("hashed")
class HashedTask(Task):
    name = "hashed"
    metrics = (
        "accuracy",
        "loss",
        "sparsity",
        "params",
        "nonzero_params",
        "stored_params",
        "compression",
        "flops_dense",
        "flops",
        "speedup",
        "bytes_dense",
        "bytes_bitmask",
        "bytes_csr",
        "bytes_best",
        "train_seconds",
        "val_accuracy",
    )

    def default_label(self, method: dict) -> str:
        return "HashedNet"

    def prepare(self, *, dataset, model, method, training, checker: Checker, sparsities):
        n_errors = checker.reported
        (m_path, m_entry), x_path = model, method[0]
        data, train, options = prepare_entries(dataset, model, method, training, checker, HASHED_KEYS)
        if train is not None and "patience" in train:
            checker.error(
                x_path,
                "the hashed task trains for the whole budget; 'training.patience' (early "
                "stopping of the dense model) does not apply to it: remove it for this method",
            )
        if "hashed" in options:
            checker.error(
                f"{m_path}.hashed",
                "the hashed task sets each model's compression from the sparsity "
                "level (1 − sparsity); remove 'hashed' from the model",
            )
        if data is None or train is None or checker.reported > n_errors:
            return None
        for i, level in enumerate(sparsities):
            if isinstance(level, dict):
                checker.error(
                    f"{x_path}",
                    f"sparsity level {i} is a per-layer mapping; the hashed task hashes "
                    f"every layer at one compression, so give it plain levels",
                )
                return None
            checker.attempt(
                m_path,
                build_bounded,
                m_entry["name"],
                input_shape=data["input_shape"],
                n_classes=data["n_classes"],
                **options,
                **_hashing(level),
            )
        if checker.reported > n_errors:
            return None
        return {
            "config": {
                "dataset": data["config"],
                "model": {"name": m_entry["name"], "options": options},
                "training": train,
            }
        }

    def resolve(self, prepared, *, sparsity, seed):
        return {
            "task": self.name,
            "version": VERSION,
            **copy.deepcopy(prepared["config"]),
            "sparsity": float(sparsity),
            "seed": seed,
        }

    def run(self, config: dict, context: dict) -> dict:
        return execute_hashed(config)


def _hashing(level: float) -> dict:
    return {"hashed": 1.0 - float(level)} if float(level) > 0 else {}


def execute_hashed(config: dict) -> dict:
    """Build, train and measure one hashed run (see the module docstring)."""
    from prunelab.metrics import summary

    started = time.perf_counter()
    ds = load_prepared_dataset(config["dataset"])
    train, seed, level = config["training"], config["seed"], config["sparsity"]
    name, options = config["model"]["name"], config["model"]["options"]
    model = build_model(name, dataset=ds, seed=seed, **options, **_hashing(level))
    epochs = train["epochs"] + train["finetune_epochs"]
    history = fit(model, ds, epochs=epochs, seed=seed, **train_kwargs(train, {}, finetune=False))
    final = evaluate(model, (ds.x_test, ds.y_test))
    stats = summary(model, ds.input_shape).total
    virtual = summary(build_model(name, dataset=ds, **options), ds.input_shape)
    weights = sum(row.prunable for row in virtual.rows)  # virtual weights of all layers
    stored = sum(m.weight.numel() for m in model.modules() if hasattr(m, "virtual_weight")) if level > 0 else weights
    metrics = {
        "accuracy": final["accuracy"],
        "loss": final["loss"],
        "sparsity": 1.0 - stored / weights,
        "params": virtual.total.params,
        "nonzero_params": stats.nonzero,
        "stored_params": stats.params,
        "compression": virtual.total.params / stats.nonzero if stats.nonzero else float("inf"),
        "flops_dense": stats.flops_dense,
        "flops": stats.flops,
        "speedup": 1.0,
        "bytes_dense": stats.bytes_dense,
        "bytes_bitmask": stats.bytes_bitmask,
        "bytes_csr": stats.bytes_csr,
        "bytes_best": stats.bytes_best,
        "train_seconds": time.perf_counter() - started,
    }
    if ds.x_val is not None:
        metrics["val_accuracy"] = evaluate(model, (ds.x_val, ds.y_val))["accuracy"]
    return {"metrics": metrics, "curve": [{"phase": "train", **h} for h in history]}
