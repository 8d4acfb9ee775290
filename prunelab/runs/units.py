"""Study-B tasks: pruning penalties of the 12 unit-pruning methods during training, and
iterative unit pruning (Evci et al., ICLR 2019 submission; STUDIES.md B).

``unit-penalty`` — one run per (dataset, model, seed). The model trains with the study's
budget; every ``every`` steps (from step ``start`` on, if given) a copy is scored once on a fixed calibration subset of the
training images and, for each probe set (layer sets × fractions or counts), pruned with
each of the 12 methods (6 scorers × without/with mean replacement). The *penalty* is the
calibration loss after pruning minus before; with ``finetune_steps`` > 0 the pruned copy is
thinned (so removed units stay removed), fine-tuned that many steps (Adam, ``finetune_lr``)
and measured again. The copies are discarded; training goes on. Which units each scorer
selects (at ``track``: layers and fraction) is recorded to follow them over training. With
``preact_error: true`` each probe also records the next layer's pre-activation error
(:mod:`prunelab.units.preact`) of the pruned copy before any fine-tuning.

``unit-iterative`` — one run per (dataset, model, method, seed). The trained model (shared
with the study's other runs through the dense cache) loses ``step_fraction`` of the original
units of every chosen layer per step, is thinned, and fine-tuned ``finetune_steps`` steps
between steps, until ``max_fraction`` is removed; the calibration loss and the test accuracy
are recorded after each step.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn

from prunelab.data import dry_run_inputs
from prunelab.runs.limits import build_bounded
from prunelab.runs.prepare import dense_model, load_prepared_dataset, prepare_entries
from prunelab.runs.tasks import TASKS, Checker, Task
from prunelab.training import Callback, evaluate, fit
from prunelab.units import METHODS, SCORERS, Units, parse_method, preact, remove_units, surgery
from prunelab.units import thin as thin_units
from prunelab.units.scoring import UNIT_SCORERS, collect, select
from prunelab.units.structure import select_layers

PENALTY_KEYS = ("label", "every", "start", "calibration", "methods", "sets", "finetune_lr", "track", "preact_error")
SET_KEYS = ("layers", "fractions", "counts", "finetune_steps")
#: The pre-activation error (``preact_error: true``) is measured on the first this many calibration
#: images: on all 1000 it would cost several times the pruning itself.
PREACT_IMAGES = 250
ITERATIVE_KEYS = (
    "label",
    "method",
    "layers",
    "step_fraction",
    "max_fraction",
    "finetune_steps",
    "finetune_lr",
    "calibration",
    "test_every",
)


def _model_and_data(dataset, model, method, training, checker: Checker, keys: tuple[str, ...]):
    """The method's keys checked, its dataset, training and model built (the start every task
    shares, :func:`prepare_entries`), and the model's units found: ``(data, train, net, units,
    model config)``, or None when something is wrong."""
    m_path, m_entry = model
    data, train, options = prepare_entries(dataset, model, method, training, checker, keys)
    if data is None or train is None or "name" not in m_entry:
        return None
    net = checker.attempt(
        m_path, build_bounded, m_entry["name"], input_shape=data["input_shape"], n_classes=data["n_classes"], **options
    )
    if net is None:
        return None
    units = checker.attempt(m_path, Units.of, net, **data["dry"])  # token ids for a language model
    if units is None:
        return None
    return data, train, net, units, {"name": net.config["name"], "options": options}


def _check_layers(path: str, layers, units: Units, checker: Checker) -> list:
    layers = layers if isinstance(layers, list) else [layers]
    for i, entry in enumerate(layers):
        checker.attempt(f"{path}[{i}]", select_layers, units.layers, entry, f"layers {entry!r}")
    return layers


def _calibration(ds, n: int, seed: int):
    """A fixed subset of the training images (the same for every probe of a run)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(ds.y_train), generator=g)[:n]
    return ds.x_train[idx], ds.y_train[idx]


def _loss(model: nn.Module, data) -> float:
    return evaluate(model, data, batch_size=1000)["loss"]


def _finetune(model: nn.Module, ds, steps: int, lr: float, seed: int) -> None:
    """``steps`` steps of Adam at batch 64 on the training set (as many epochs as that takes)."""
    fit(
        model,
        ds,
        epochs=math.ceil(steps * 64 / len(ds.y_train)) + 1,
        max_steps=steps,
        batch_size=64,
        lr=lr,
        optimizer="adam",
        seed=seed,
        progress=False,
    )


class _UnitTask(Task):
    """What both study-B tasks share: one config of dataset, model, training and the method's part."""

    @staticmethod
    def _prepared(data, model_cfg, train, part: str, settings: dict) -> dict:
        return {
            "config": {"dataset": data["config"], "model": model_cfg, "training": train, "method": {part: settings}}
        }

    def resolve(self, prepared, *, sparsity, seed):
        return {
            "task": self.name,
            "version": 1,
            **copy.deepcopy(prepared["config"]),
            "sparsity": sparsity,
            "seed": seed,
        }

    @staticmethod
    def _begin(dataset, model, method, training, checker, keys):
        """Check the method's keys and build its dataset, training and model: ``(x_path, entry,
        errors so far, ready)`` with ``ready`` None when something is wrong."""
        x_path, entry = method
        n = checker.reported
        ready = _model_and_data(dataset, model, method, training, checker, (*keys, "training"))
        return x_path, entry, n, ready


# ---------------------------------------------------------------------------- penalties
@TASKS.register("unit-penalty")
class UnitPenaltyTask(_UnitTask):
    name = "unit-penalty"

    def default_label(self, method: dict) -> str:
        return "probes"

    def prepare(self, *, dataset, model, method, training, checker, sparsities):
        x_path, entry, n, ready = self._begin(dataset, model, method, training, checker, PENALTY_KEYS)
        if ready is None:
            return None
        data, train, net, units, model_cfg = ready
        probe = {
            "every": entry.get("every", 250),
            "calibration": entry.get("calibration", 1000),
            "methods": entry.get("methods", list(METHODS)),
            "finetune_lr": entry.get("finetune_lr", 1e-3),
            "sets": entry.get("sets", [{"layers": ["all"], "fractions": [0.1]}]),
            "track": entry.get("track", {"layers": "all", "fraction": 0.1}),
        }
        checker.number(f"{x_path}.every", probe["every"], low=1, integer=True)
        # optional, resolved only when given (so older specs keep their run ids)
        if entry.get("start") is not None:
            probe["start"] = checker.number(f"{x_path}.start", entry["start"], low=0, integer=True)
        if entry.get("preact_error") is not None:
            if not isinstance(entry["preact_error"], bool):
                checker.error(f"{x_path}.preact_error", f"must be true or false; got {entry['preact_error']!r}")
            elif entry["preact_error"]:
                probe["preact_error"] = True
        checker.number(f"{x_path}.calibration", probe["calibration"], low=1, high=data["n_train"], integer=True)
        checker.number(f"{x_path}.finetune_lr", probe["finetune_lr"], low=0.0, closed="neither")
        if not isinstance(probe["methods"], list) or not probe["methods"]:
            checker.error(f"{x_path}.methods", f"must be a non-empty list of methods among: {', '.join(METHODS)}")
        else:
            for i, m in enumerate(probe["methods"]):
                checker.attempt(f"{x_path}.methods[{i}]", parse_method, m, "unit-penalty")
        if not isinstance(probe["sets"], list) or not probe["sets"]:
            checker.error(f"{x_path}.sets", "must be a non-empty list of {layers, fractions, counts, finetune_steps}")
            probe["sets"] = []
        for i, s in enumerate(probe["sets"]):
            path = f"{x_path}.sets[{i}]"
            if not isinstance(s, dict):
                checker.error(path, f"must be a mapping with keys {', '.join(SET_KEYS)}; got {s!r}")
                continue
            checker.keys(path, s, SET_KEYS)
            s.setdefault("layers", ["all"])
            s["layers"] = _check_layers(f"{path}.layers", s["layers"], units, checker)
            s.setdefault("fractions", [])
            s.setdefault("counts", [])
            s.setdefault("finetune_steps", [0])
            if not s["fractions"] and not s["counts"]:
                checker.error(path, "needs 'fractions' and/or 'counts' of units to remove per layer")
            for j, f in enumerate(s["fractions"]):
                checker.number(f"{path}.fractions[{j}]", f, low=0.0, high=1.0, closed="neither")
            for j, c in enumerate(s["counts"]):
                checker.number(f"{path}.counts[{j}]", c, low=1, integer=True)
            for j, t in enumerate(s["finetune_steps"]):
                checker.number(f"{path}.finetune_steps[{j}]", t, low=0, integer=True)
        track = probe["track"]
        if track is not None:
            if not isinstance(track, dict) or set(track) - {"layers", "fraction"}:
                checker.error(f"{x_path}.track", f"must be null or {{layers, fraction}}; got {track!r}")
            else:
                checker.attempt(f"{x_path}.track.layers", select_layers, units.layers, track.get("layers", "all"))
                checker.number(
                    f"{x_path}.track.fraction", track.get("fraction", 0.1), low=0.0, high=1.0, closed="neither"
                )
        if checker.reported > n:
            return None
        return self._prepared(data, model_cfg, train, "probe", probe)

    def run(self, config, context):
        started = time.perf_counter()
        ds = load_prepared_dataset(config["dataset"])
        probe = config["method"]["probe"]
        calibration = _calibration(ds, probe["calibration"], config["seed"])
        monitor = PenaltyProbe(ds, calibration, probe, config["seed"])
        model, history, _, _ = dense_model(config, ds, context.get("cache_dir"), callbacks=[monitor], force=True)
        final = evaluate(model, (ds.x_test, ds.y_test))
        return {
            "metrics": {
                "accuracy": final["accuracy"],
                "loss": final["loss"],
                "probes": monitor.records,
                "selections": monitor.selections,
                "units_total": monitor.units_total,
                "probe_seconds": monitor.seconds,
                "train_seconds": time.perf_counter() - started,
            },
            "curve": [{"phase": "dense", **h} for h in history],
        }


class PenaltyProbe(Callback):
    """Every ``every`` steps: prune copies of the model with every method, record the penalties."""

    def __init__(self, ds, calibration, probe: dict, seed: int):
        self.ds, self.calibration, self.probe, self.seed = ds, calibration, probe, seed
        self.records: list[dict] = []
        self.selections: list[dict] = []
        self.units_total: dict[str, int] = {}
        self.seconds = 0.0

    def on_step_end(self, state) -> None:
        if state.step % self.probe["every"] == 0 and state.step >= self.probe.get("start", 0):
            started = time.perf_counter()
            self._probe(state.model, state.step)
            self.seconds += time.perf_counter() - started

    def _probe(self, model: nn.Module, step: int) -> None:
        snapshot = copy.deepcopy(model).eval()
        info = Units.of(snapshot, **dry_run_inputs(self.ds))
        layers = info.layers
        self.units_total = {u.name: u.n_units for u in layers}
        cal = self.calibration
        batches = [(cal[0][i : i + 250], cal[1][i : i + 250]) for i in range(0, len(cal[0]), 250)]
        stats = collect(snapshot, layers, batches)
        before = _loss(snapshot, cal)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        scores = {s: {u.name: UNIT_SCORERS.get(s)(u, stats[u.name], generator) for u in layers} for s in SCORERS}
        track = self.probe.get("track")
        if track:
            for scorer in SCORERS:
                for unit in select_layers(layers, track.get("layers", "all")):
                    chosen = select(scores[scorer][unit.name], fraction=track.get("fraction", 0.1))
                    self.selections.append(
                        {"step": step, "scorer": scorer, "layer": unit.name, "units": chosen.tolist()}
                    )
        means = {u.name: stats[u.name].mean for u in layers}
        dense_in: dict = {}
        dense_out: dict = {}
        if self.probe.get("preact_error"):  # every consumer's input and pre-activation, unpruned
            consumers = [u.consumer.name for u in layers if u.consumer is not None]
            dense_in, dense_out = preact.capture(snapshot, consumers, cal[0][:PREACT_IMAGES])
        for probe_set in self.probe["sets"]:
            amounts = [("fraction", f) for f in probe_set["fractions"]] + [("count", c) for c in probe_set["counts"]]
            for layer_set in probe_set["layers"]:
                names = [u.name for u in select_layers(layers, layer_set)]
                for kind, amount in amounts:
                    for method in self.probe["methods"]:
                        scorer, mean_replacement = parse_method(method)
                        plan = {name: select(scores[scorer][name], **{kind: amount}) for name in names}
                        pruned = copy.deepcopy(snapshot)
                        pruned_info = Units.of(pruned, **dry_run_inputs(self.ds))
                        assert pruned_info.chain is not None  # study B's models are chains (checked when planned)
                        surgery.mask_units(pruned_info.chain, plan, means if mean_replacement else None)
                        after = _loss(pruned, cal)
                        extra = {}
                        if self.probe.get("preact_error"):
                            extra = _preact_fields(
                                preact.preactivation_errors(
                                    layers, plan, dense_in, dense_out, pruned, cal[0][:PREACT_IMAGES]
                                )
                            )
                        base = {
                            "step": step,
                            "method": method,
                            "scorer": scorer,
                            "mean_replacement": mean_replacement,
                            "layers": layer_set if isinstance(layer_set, str) else ",".join(layer_set),
                            "fraction": amount if kind == "fraction" else None,
                            "count": amount if kind == "count" else None,
                            "loss_before": before,
                        }
                        for steps in probe_set["finetune_steps"]:
                            loss = after if steps == 0 else self._finetuned(pruned, plan, steps, step)
                            self.records.append(
                                {
                                    **base,
                                    "finetune_steps": steps,
                                    "loss_after": loss,
                                    "penalty": loss - before,
                                    **extra,
                                }
                            )

    def _finetuned(self, pruned, plan, steps: int, step: int) -> float:
        small = thin_units(pruned, plan, **dry_run_inputs(self.ds))
        _finetune(small, self.ds, steps, self.probe["finetune_lr"], self.seed + step)
        return _loss(small, self.calibration)


def _preact_fields(errors: dict[str, dict[str, float]]) -> dict:
    """A probe's pre-activation fields (docs/unit-results.md): the mean over the consumers of the
    local and network errors, and each consumer's ``[local, network]``."""
    finite = lambda values: [v for v in values if math.isfinite(v)]
    local = finite(e["local"] for e in errors.values())
    network = finite(e["network"] for e in errors.values())
    return {
        "preact_error": sum(local) / len(local) if local else None,
        "preact_error_net": sum(network) / len(network) if network else None,
        "preact_layers": {
            name: [v if math.isfinite(v) else None for v in (e["local"], e["network"])] for name, e in errors.items()
        },
    }


# ---------------------------------------------------------------------------- iterative
@TASKS.register("unit-iterative")
class UnitIterativeTask(_UnitTask):
    name = "unit-iterative"

    def default_label(self, method: dict) -> str:
        return str(method.get("method", "?"))

    def prepare(self, *, dataset, model, method, training, checker, sparsities):
        x_path, entry, n, ready = self._begin(dataset, model, method, training, checker, ITERATIVE_KEYS)
        if ready is None:
            return None
        data, train, net, units, model_cfg = ready
        if "method" not in entry:
            checker.error(x_path, f"missing 'method', one of: {', '.join(METHODS)}")
            return None
        checker.attempt(f"{x_path}.method", parse_method, entry["method"], "unit-iterative")
        it = {
            "method": entry["method"],
            "layers": entry.get("layers", "all"),
            "step_fraction": entry.get("step_fraction", 0.01),
            "max_fraction": entry.get("max_fraction", 0.5),
            "finetune_steps": entry.get("finetune_steps", 100),
            "finetune_lr": entry.get("finetune_lr", 1e-3),
            "calibration": entry.get("calibration", 1000),
            "test_every": entry.get("test_every", 1),
        }
        checker.attempt(f"{x_path}.layers", select_layers, units.layers, it["layers"])
        checker.number(f"{x_path}.step_fraction", it["step_fraction"], low=0.0, high=1.0, closed="neither")
        checker.number(f"{x_path}.max_fraction", it["max_fraction"], low=0.0, high=1.0, closed="neither")
        checker.number(f"{x_path}.finetune_steps", it["finetune_steps"], low=0, integer=True)
        checker.number(f"{x_path}.finetune_lr", it["finetune_lr"], low=0.0, closed="neither")
        checker.number(f"{x_path}.calibration", it["calibration"], low=1, high=data["n_train"], integer=True)
        checker.number(f"{x_path}.test_every", it["test_every"], low=1, integer=True)
        if checker.reported > n:
            return None
        return self._prepared(data, model_cfg, train, "iterative", it)

    def run(self, config, context):
        started = time.perf_counter()
        ds = load_prepared_dataset(config["dataset"])
        it, seed = config["method"]["iterative"], config["seed"]
        model, _, _, _ = dense_model(config, ds, context.get("cache_dir"))
        dry = dry_run_inputs(ds)
        calibration = _calibration(ds, it["calibration"], seed)
        test = (ds.x_test, ds.y_test)
        chosen = select_layers(Units.of(model, **dry).layers, it["layers"])
        original = {u.name: u.n_units for u in chosen}
        per_step = {name: max(1, round(it["step_fraction"] * n)) for name, n in original.items()}
        total = sum(original.values())
        records = [
            {
                "removed": 0.0,
                "step": 0,
                "loss": _loss(model, calibration),
                "accuracy": evaluate(model, test)["accuracy"],
            }
        ]
        step = 0
        while True:
            info = Units.of(model, **dry)
            layers = {u.name: u for u in info.layers}
            counts = {name: min(per_step[name], layers[name].n_units - 1) for name in original}
            if not any(counts.values()):
                break
            step += 1
            for name, count in counts.items():  # each chosen layer loses its own count
                if count:
                    result = remove_units(
                        model,
                        it["method"],
                        calibration,
                        count=count,
                        layers=[name],
                        units=info,
                        seed=seed * 7919 + step,
                    )
                    model = thin_units(model, result)
                    info = Units.of(model, **dry)
            removed = 1.0 - sum(u.n_units for u in info.layers if u.name in original) / total
            if it["finetune_steps"]:
                _finetune(model, ds, it["finetune_steps"], it["finetune_lr"], seed * 7919 + step)
            last = removed >= it["max_fraction"] - 1e-9
            record = {"removed": removed, "step": step, "loss": _loss(model, calibration)}
            if last or step % it["test_every"] == 0:  # the test set costs more than the step itself
                record["accuracy"] = evaluate(model, test)["accuracy"]
            records.append(record)
            if last:
                break
        params = sum(p.numel() for p in model.parameters())
        return {
            "metrics": {
                "accuracy": records[-1]["accuracy"],
                "loss": records[-1]["loss"],
                "iterative": records,
                "params": params,
                "train_seconds": time.perf_counter() - started,
            },
            "curve": [],
        }
