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

``accuracy_last_prune`` is the test accuracy right after the schedule's last event (for a
schedule whose last event is at step 0, such as one-shot, it is ``accuracy_pruned``); with
``training.report_at_steps: [k, ...]`` (optional) the run also records ``accuracy_at_<k>``, the
test accuracy ``k`` fine-tuning steps (of ``training.batch_size`` samples) after the last event.

Schedule timing may be written in epochs (``start_epochs``, ``every_epochs``,
``at_epochs``); it is resolved into optimiser steps of the fine-tuning phase.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any, Protocol, cast

import torch

from prunelab.data import dry_run_inputs, takes_token_ids
from prunelab.pruning import Pruner, make_regularizer, make_schedule
from prunelab.pruning.targets import resolve_targets
from prunelab.runs.limits import build_bounded
from prunelab.runs.prepare import (
    dense_model,
    distill_kwargs,
    finetune_step_count,
    load_prepared_dataset,
    prepare_distill,
    prepare_entries,
    prepare_latency,
    train_kwargs,
)
from prunelab.runs.tasks import TASKS, Checker, Task
from prunelab.training import Callback, RecoveryMonitor, evaluate, fit, steps_per_epoch

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
METHOD_DEFAULTS: dict[str, Any] = {
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
        "accuracy_last_prune",
        "accuracy_at_<K>",
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
        n_errors = checker.reported
        m_path, m_entry = model
        x_path, x_entry = method
        data, train, options = prepare_entries(
            dataset, model, method, training, checker, METHOD_KEYS, step_reports=True
        )
        if data is None or train is None or checker.reported > n_errors:
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
        method_entry = {k: v for k, v in x_entry.items() if k != "training"}  # already in train
        m = _prepare_method(x_path, method_entry, net, per_epoch, train, sparsities, checker, dry=data["dry"])
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
    n = checker.reported
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
        report = train.get("report_at_steps")
        last = built.last_step or 0
        if report and last + report[-1] > finetune_steps:
            checker.error(
                path,
                f"training.report_at_steps asks for the accuracy {report[-1]} steps after the last prune "
                f"(step {last}), at step {last + report[-1]}, after the {finetune_steps} fine-tuning steps "
                f"({train['finetune_epochs']} epochs x {per_epoch} steps); raise training.finetune_epochs "
                "or lower the steps",
            )
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
        distill = prepare_distill(f"{path}.distill", method["distill"], train, checker)
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
    return None if checker.reported > n else method


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


def execute_prune(config: dict, cache_dir: str | None = None) -> dict:
    started = time.perf_counter()
    ds = load_prepared_dataset(config["dataset"])
    method, train, seed = config["method"], config["training"], config["seed"]
    model, dense_history, snapshot, cached = dense_model(config, ds, cache_dir)
    test = (ds.x_test, ds.y_test)
    dense = evaluate(model, test)
    accuracy_dense = dense["accuracy"]
    lm = dense_language_model_metrics(model, ds, train, dense, dense_history) if takes_token_ids(ds) else None
    distill = distill_kwargs(method, model)  # the teacher: the dense model, copied before pruning
    pruner = make_pruner(config, model, ds, snapshot)
    pruner.update()
    pruned = evaluate(model, test)
    accuracy_pruned = pruned["accuracy"]
    if lm is not None:
        lm["perplexity_pruned"] = pruned["perplexity"]
    probe = AccuracyProbe(test, probe_steps(pruner, train))
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
            callbacks=[c for c in (monitor, probe) if c is not None],
            **distill,
            max_steps=train.get("finetune_steps"),
            **train_kwargs(train, method, finetune=True),
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
        probed=probe.values,
    )
    if train.get("patience") and metrics.get("val_accuracy_dense") is not None:  # the epoch kept, not the last
        best = min((h for h in dense_history if "val_loss" in h), key=lambda h: h["val_loss"])
        metrics["val_accuracy_dense"] = best["val_accuracy"]
    return {
        "metrics": metrics,
        "curve": [{"phase": "dense", **h} for h in dense_history] + [{"phase": "prune", **h} for h in history],
    }


def probe_steps(pruner: Pruner, train: dict) -> dict[int, str]:
    """``{fine-tuning step: metric}`` of a run's probes: ``accuracy_last_prune`` at the schedule's
    last event when it comes after step 0, and ``accuracy_at_<k>`` ``k`` steps after it for each
    ``k`` of ``training.report_at_steps``."""
    last = pruner.schedule.last_step or 0
    steps = {last + k: f"accuracy_at_{k}" for k in train.get("report_at_steps") or ()}
    if last > 0:
        steps[last] = "accuracy_last_prune"
    return steps


class AccuracyProbe(Callback):
    """Records the accuracy on ``data`` at the end of the given training steps (``{step: metric
    name}``), after the Pruner's event of that step (``fit`` calls the Pruner first)."""

    def __init__(self, data, steps: dict[int, str]):
        self.data, self.steps = data, dict(steps)
        self.values: dict[str, float] = {}

    def on_step_end(self, state) -> None:
        name = self.steps.get(state.step)
        if name is not None and name not in self.values:
            self.values[name] = evaluate(state.model, self.data)["accuracy"]


class SolverReport(Protocol):
    """What a layer-wise solver's report (L-OBS, Wanda block by block) offers: per-layer rows and totals."""

    def totals(self) -> dict[str, float]: ...

    def __iter__(self) -> Iterator[Any]: ...


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
    probed: dict | None = None,
) -> dict:
    """The metrics a prune run stores, from its final model and Pruner (with ``thin``, also
    those of :func:`thinned_metrics`; for a language model, also test ``perplexity`` and
    ``val_perplexity``, with the dense and just-pruned ones in ``language_model``). ``probed``: the
    accuracies an :class:`AccuracyProbe` recorded during fine-tuning (``accuracy_last_prune``, when
    the last event came after step 0 — else it is ``accuracy_pruned`` —, and ``accuracy_at_<k>``)."""
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
    if not pruner.schedule.last_step:  # every event at step 0: measured right after them
        metrics["accuracy_last_prune"] = accuracy_pruned
    metrics.update(probed or {})
    if thin:
        metrics.update(thinned_metrics(model, ds))
    if latency:
        metrics.update(latency_metrics(model, ds, latency))
    if monitor is not None:
        metrics["retrain_steps"] = monitor.steps_to_recover
        metrics["retrain_curve"] = monitor.curve
    reports = [cast(SolverReport, record.report) for record in pruner.history if record.report is not None]
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
