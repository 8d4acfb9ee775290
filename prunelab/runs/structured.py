"""The ``structured`` task: remove attention heads, MLP channels and whole blocks of a transformer
(:func:`prunelab.units.prune_transformer`), optionally refit, recover, measure.

One run = (dataset, model, method, level, seed). The dense model is the ``prune`` task's (trained
the same way and shared through the same cache), then at level ``s``:

1. every attention layer loses the fraction ``s`` of its heads (``heads: true``, the default) and
   every MLP the fraction ``s`` of its channels (``mlp: true``), and ``blocks: k`` whole blocks go
   (the ``k`` that change their input least on the calibration data); ``refit: true`` refits the
   projections that read removed units by least squares (``refit: false``: no refit);
   ``round_to: m`` rounds the kept widths to multiples of ``m``; ``calibration``: the first
   training sequences used for scoring and refitting (default 128);
2. the thinned model is measured right after the cut (``perplexity_pruned``), then recovered by
   the method's fine-tuning (``training.finetune_epochs``/``finetune_steps``; ``distill`` from the
   dense model, as in the ``prune`` task);
3. records: test ``perplexity`` (dense, pruned, final), ``val_perplexity``, ``params`` and
   ``params_dense``, ``sparsity`` (the fraction of parameters removed), ``compression``, FLOPs
   (``flops``, ``flops_dense``, their ratio ``speedup``), the measured prefill latency of the dense
   and the thinned model at each of ``latency.batch_sizes`` (default 1 and 16; one thread, median
   of interleaved rounds) with ``measured_speedup_b<B>``, the removed blocks and the kept widths.

In a spec (levels are the method's own ``sparsities``; a blocks-only method takes ``[0.0]``)::

    methods:
      - {label: heads+mlp, task: structured, sparsities: [0.25, 0.5], refit: {grid: [false, true]}}
      - {label: blocks, task: structured, heads: false, mlp: false, blocks: {grid: [1, 2]},
         sparsities: [0.0]}
"""

from __future__ import annotations

import copy
import time

from prunelab.data import dry_run_inputs, takes_token_ids
from prunelab.runs.limits import build_bounded
from prunelab.runs.prepare import (
    dense_model,
    load_prepared_dataset,
    prepare_distill,
    prepare_entries,
    prepare_latency,
    train_kwargs,
)
from prunelab.runs.tasks import TASKS, Checker, Task
from prunelab.training import evaluate, fit

STRUCTURED_KEYS = (
    "label",
    "heads",
    "mlp",
    "blocks",
    "refit",
    "round_to",
    "calibration",
    "training",
    "distill",
    "latency",
)
STRUCTURED_DEFAULTS = {"heads": True, "mlp": True, "blocks": 0, "refit": True, "round_to": 1, "calibration": 128}
LATENCY_DEFAULTS = {"batch_sizes": [1, 16], "threads": 1, "rounds": 3}
VERSION = 1


@TASKS.register("structured")
class StructuredTask(Task):
    name = "structured"
    metrics = (
        "accuracy",
        "loss",
        "perplexity",
        "perplexity_dense",
        "perplexity_pruned",
        "val_perplexity",
        "val_accuracy",
        "sparsity",
        "compression",
        "params",
        "params_dense",
        "flops",
        "flops_dense",
        "speedup",
        "blocks_removed",
        "refits",
        "train_seconds",
        "latency_ms_b<B>",
        "latency_dense_ms_b<B>",
        "measured_speedup_b<B>",
    )

    def default_label(self, method: dict) -> str:
        parts = [what for what in ("heads", "mlp") if method.get(what, True)]
        if method.get("blocks"):
            parts.append(f"blocks={method['blocks']}")
        return "structured/" + "+".join(parts or ["none"]) + ("/refit" if method.get("refit", True) else "")

    def prepare(self, *, dataset, model, method, training, checker: Checker, sparsities):
        n_errors = checker.reported
        (m_path, m_entry), (x_path, x_entry) = model, method
        data, train, options = prepare_entries(dataset, model, method, training, checker, STRUCTURED_KEYS)
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
        resolved = _prepare_structured(x_path, x_entry, train, checker)
        if net is None or resolved is None:
            return None
        levels = [s for s in sparsities if not isinstance(s, dict)]
        if len(levels) != len(sparsities):
            checker.error(
                x_path,
                "a per-layer sparsity mapping is not a level of the structured task; give it "
                "plain levels (the fraction of heads and MLP channels removed)",
            )
            return None
        if not (resolved["heads"] or resolved["mlp"]) and any(levels):
            checker.error(
                f"{x_path}.sparsities",
                "with heads: false and mlp: false a level removes nothing; give this method sparsities: [0.0]",
            )
            return None
        if not (resolved["heads"] or resolved["mlp"] or resolved["blocks"]):
            checker.error(x_path, "removes nothing: set heads or mlp to true, or blocks to a count ≥ 1")
            return None
        _check_applies(x_path, net, resolved, max(levels, default=0.0), data, checker)
        if checker.reported > n_errors:
            return None
        return {
            "config": {
                "dataset": data["config"],
                "model": {"name": net.config["name"], "options": options},
                "training": train,
                "method": resolved,
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
        return execute_structured(config, context.get("cache_dir"))


def _prepare_structured(path: str, entry: dict, train: dict, checker: Checker) -> dict | None:
    """The method's options, checked and with the defaults filled in."""
    n = checker.reported
    method = {**STRUCTURED_DEFAULTS, **{k: v for k, v in entry.items() if k in STRUCTURED_DEFAULTS}}
    for key in ("heads", "mlp"):
        if not isinstance(method[key], bool):
            checker.error(
                f"{path}.{key}", f"must be true (remove the level's fraction of them) or false; got {method[key]!r}"
            )
    checker.number(f"{path}.blocks", method["blocks"], low=0, integer=True)
    if not isinstance(method["refit"], bool) and method["refit"] not in ("layerwise", "sequential"):
        checker.error(f"{path}.refit", f"must be true, false, 'layerwise' or 'sequential'; got {method['refit']!r}")
    elif method["refit"] is True:
        method["refit"] = "layerwise"
    checker.number(f"{path}.round_to", method["round_to"], low=1, integer=True)
    checker.number(f"{path}.calibration", method["calibration"], low=1, integer=True)
    if "distill" in entry:
        distill = prepare_distill(f"{path}.distill", entry["distill"], train, checker)
        if distill is not None:
            method["distill"] = distill
    method["latency"] = prepare_latency(
        f"{path}.latency",
        entry.get("latency", True),
        checker,
        LATENCY_DEFAULTS,
        "true, false or a mapping {batch_sizes: [1, 16], threads: 1, rounds: 3}",
    )
    return None if checker.reported > n else method


def _check_applies(path: str, net, method: dict, level: float, data: dict, checker: Checker) -> None:
    """Cut ``net`` (untrained) the way the method will, without data: heads/MLP channels found, the
    block count below the model's, the levels in range."""
    from prunelab.units import prune_transformer

    example = (data.get("dry") or {}).get("example_inputs")
    checker.attempt(
        path,
        prune_transformer,
        net,
        None,
        heads=level if method["heads"] else 0.0,
        mlp=level if method["mlp"] else 0.0,
        blocks=list(range(method["blocks"])),
        refit=False,
        scorer="norm",
        round_to=method["round_to"],
        example_inputs=example,
    )


# ---------------------------------------------------------------- running
def execute_structured(config: dict, cache_dir: str | None = None) -> dict:
    from prunelab.units import prune_transformer

    started = time.perf_counter()
    ds = load_prepared_dataset(config["dataset"])
    method, train, seed, level = config["method"], config["training"], config["seed"], config["sparsity"]
    dense, dense_history, _, cached = dense_model({**config, "method": {}}, ds, cache_dir)
    test = (ds.x_test, ds.y_test)
    before = evaluate(dense, test)
    n_cal = min(method["calibration"], len(ds.y_train))
    result = prune_transformer(
        dense,
        (ds.x_train[:n_cal], ds.y_train[:n_cal]),
        heads=level if method["heads"] else 0.0,
        mlp=level if method["mlp"] else 0.0,
        blocks=method["blocks"],
        refit=method["refit"],
        round_to=method["round_to"],
        seed=seed,
        **({"example_inputs": ds.x_train[:2]} if takes_token_ids(ds) else {}),
    )
    model = result.model
    pruned = evaluate(model, test)
    distill = method.get("distill")
    history = []
    if train["finetune_epochs"]:
        kd = (
            {
                "distill_from": copy.deepcopy(dense),
                "distill_weight": distill["weight"],
                "temperature": distill["temperature"],
            }
            if distill
            else {}
        )
        history = fit(
            model,
            ds,
            epochs=train["finetune_epochs"],
            seed=seed,
            max_steps=train.get("finetune_steps"),
            **kd,
            **train_kwargs(train, {}, finetune=True),
        )
    metrics = _metrics(dense, model, ds, result, before, pruned, method.get("latency"))
    metrics.update(dense_cached=cached, train_seconds=time.perf_counter() - started)
    return {
        "metrics": metrics,
        "curve": [{"phase": "dense", **h} for h in dense_history] + [{"phase": "prune", **h} for h in history],
    }


def _metrics(dense, model, ds, result, before: dict, pruned: dict, latency: dict | None) -> dict:
    """What a structured run records (see the module docstring)."""
    from prunelab.metrics import count_flops

    final = evaluate(model, (ds.x_test, ds.y_test))
    dry = dry_run_inputs(ds)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("dense", dense), ("pruned", model))}
    flops = {
        name: sum(c.dense for c in count_flops(m, **dry).values()) for name, m in (("dense", dense), ("pruned", model))
    }
    metrics = {
        "accuracy": final["accuracy"],
        "loss": final["loss"],
        "params": params["pruned"],
        "params_dense": params["dense"],
        "sparsity": 1 - params["pruned"] / params["dense"],
        "compression": params["dense"] / params["pruned"],
        "flops": flops["pruned"],
        "flops_dense": flops["dense"],
        "speedup": flops["dense"] / flops["pruned"],
        "blocks_removed": len(result.removed_blocks),
        "removed_blocks": list(result.removed_blocks),
        "kept": dict(result.kept),
        "refits": sum(1 for r in result.refits if r.applied),
        "notes": dict(result.notes),
    }
    if "perplexity" in final:
        metrics.update(
            perplexity=final["perplexity"],
            perplexity_dense=before["perplexity"],
            perplexity_pruned=pruned["perplexity"],
            tokens=final["tokens"],
        )
    if ds.x_val is not None:
        val = evaluate(model, (ds.x_val, ds.y_val))
        metrics["val_accuracy"] = val["accuracy"]
        if "perplexity" in val:
            metrics["val_perplexity"] = val["perplexity"]
    if latency:
        metrics.update(_latency(dense, model, ds, latency))
    return metrics


def _latency(dense, model, ds, options: dict) -> dict:
    """Median prefill latency of the dense and the thinned model, measured in interleaved rounds."""
    from prunelab.units.report import speed_report

    example = dry_run_inputs(ds).get("example_inputs")
    if example is None:
        example = ds.x_train[:1]
    report = speed_report(
        {"dense": dense, "pruned": model},
        example,
        batch_sizes=tuple(options["batch_sizes"]),
        threads=options["threads"],
        rounds=options["rounds"],
    )
    rows = {row.name: row for row in report.rows}
    out = {}
    for size in options["batch_sizes"]:
        out.update(
            {
                f"latency_ms_b{size}": rows["pruned"].latency_ms[size],
                f"latency_dense_ms_b{size}": rows["dense"].latency_ms[size],
                f"measured_speedup_b{size}": rows["dense"].latency_ms[size] / rows["pruned"].latency_ms[size],
            }
        )
    return out
