"""Study E's tables from its store: every design point per model and level, and the main effect
of each design choice (granularity, schedule, criterion, scope).

    python docs/results/study-e/summarize.py results/study-e/study.db > docs/results/study-e/summary.md

A run's design point is read from its method label, ``design[granularity=...,schedule=...,
criterion=...,scope=...]`` (a method without a grid of an axis, such as ``granularity: kernel``,
has that value in the spec; its label lacks the key, so it is taken from the run's config).
The main effect of a choice is the mean over runs that share that choice: every other axis and
seed averaged out, over the design points that exist for both values (kernel granularity exists
for LeNet-5 only).
"""

from __future__ import annotations

import re
import statistics
import sys
from collections import defaultdict

from prunelab.experiments.store import Store

AXES = ("granularity", "schedule", "criterion", "scope")
METRICS = (
    ("accuracy", "accuracy %", 100.0, 2),
    ("compression", "compression", 1.0, 2),
    ("speedup", "theoretical speedup", 1.0, 2),
    ("measured_speedup", "measured speedup", 1.0, 2),
    ("units_removed", "units removed by thinning", 1.0, 1),
)


def design(record) -> dict[str, str]:
    """The four design choices of a run."""
    point = dict(re.findall(r"(\w+)=([\w-]+)", record.method))
    method = record.config.get("method", {})
    point.setdefault("granularity", method.get("granularity", "?"))
    point.setdefault("scope", method.get("scope", "?"))
    point.setdefault("criterion", method.get("criterion", "?"))
    point.setdefault("schedule", method.get("schedule", {}).get("name", "?"))
    return {axis: point[axis] for axis in AXES}


def cell(values: list[float], scale: float, digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def main(db: str) -> None:
    with Store(db) as store:
        records = [r for r in store.records(status="done") if r.in_spec]
    print(f"# Study E summary ({len(records)} finished runs)\n")
    for model in sorted({r.model for r in records}):
        runs = [r for r in records if r.model == model]
        levels = sorted({r.sparsity for r in runs})
        print(f"## {model}\n")
        dense = statistics.mean(r.metrics["accuracy_dense"] for r in runs)
        print(f"Dense accuracy before pruning (mean over runs): {100 * dense:.2f} %\n")
        for sparsity in levels:
            groups: dict[tuple, list] = defaultdict(list)
            for r in runs:
                if r.sparsity == sparsity:
                    groups[tuple(design(r).values())].append(r.metrics)
            print(f"### {100 * sparsity:g} % of the prunable weights\n")
            print("| " + " | ".join(AXES) + " | " + " | ".join(label for _, label, _, _ in METRICS) + " | seeds |")
            print("|" + "---|" * len(AXES) + "---:|" * (len(METRICS) + 1))
            ranked = sorted(groups.items(), key=lambda item: -statistics.mean(m["accuracy"] for m in item[1]))
            for point, ms in ranked:
                cells = [cell([m[key] for m in ms if key in m], scale, digits) for key, _, scale, digits in METRICS]
                print("| " + " | ".join(point) + " | " + " | ".join(cells) + f" | {len(ms)} |")
            print()
        print(f"### Main effects ({model}): mean over the other choices and the seeds\n")
        for key, label, scale, digits in METRICS:
            if key in ("compression", "speedup"):  # equal for every choice, up to whole-filter rounding
                continue
            print(f"**{label}**\n")
            print("| choice | " + " | ".join(f"{100 * s:g} %" for s in levels) + " |")
            print("|---|" + "---:|" * len(levels))
            for axis in AXES:
                for value in sorted({design(r)[axis] for r in runs}):
                    row = []
                    for sparsity in levels:
                        values = [
                            r.metrics[key]
                            for r in runs
                            if r.sparsity == sparsity and design(r)[axis] == value and key in r.metrics
                        ]
                        row.append(f"{scale * statistics.mean(values):.{digits}f}" if values else "–")
                    print(f"| {axis} = {value} | " + " | ".join(row) + " |")
            print()
        layer_sparsity(runs, levels, model)


def layer_sparsity(runs, levels, model: str) -> None:
    """Each layer's realised sparsity (%) per granularity and scope: the mean over schedules,
    criteria and seeds."""
    layers = list(dict.fromkeys(name for r in runs for name in r.metrics.get("layer_sparsity", {})))
    print(f"### Per-layer sparsity ({model}, %): mean over schedules, criteria and seeds\n")
    print("| granularity | scope | level | " + " | ".join(layers) + " |")
    print("|---|---|---:|" + "---:|" * len(layers))
    points = sorted({(design(r)["granularity"], design(r)["scope"]) for r in runs})
    for granularity, scope in points:
        for sparsity in levels:
            chosen = [
                r.metrics["layer_sparsity"]
                for r in runs
                if r.sparsity == sparsity and (design(r)["granularity"], design(r)["scope"]) == (granularity, scope)
            ]
            cells = [
                f"{100 * statistics.mean(m[name] for m in chosen):.1f}"
                if all(name in m for m in chosen)
                else "not pruned"
                for name in layers
            ]
            print(f"| {granularity} | {scope} | {100 * sparsity:g} | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/study-e/study.db")
