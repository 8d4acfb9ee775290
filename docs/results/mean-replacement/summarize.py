"""Extra tables of study B from its store: how often mean replacement lowers the penalty, per
setting and per scorer, and the run times.

    python docs/results/mean-replacement/summarize.py results/study-b-session/study.db \
        > docs/results/mean-replacement/summary.md

A *pair* is one scorer at one measurement (run, probe step, layers, amount, fine-tuning steps):
its penalty without mean replacement (d) and with it (d_bp, the same units removed). Mean
replacement "helps" when d_bp < d; both equal counts as neither.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from prunelab.experiments.store import Store
from prunelab.experiments.unit_results import run_probes
from prunelab.units import LAYER_SETS


def amount_text(amount: tuple[str, float]) -> str:
    kind, value = amount
    return (
        "1 unit"
        if kind == "count" and value == 1
        else (f"{value:g} units" if kind == "count" else f"{100 * value:g} %")
    )


def pairs(records):
    """(model, layers, amount, finetune_steps, scorer) → list of (d, d_bp)."""
    out = defaultdict(list)
    for record in records:
        by_key = {}
        for p in run_probes(record):
            by_key[(p.measurement, p.scorer, p.mean_replacement)] = p
        for (measurement, scorer, bp), p in by_key.items():
            if bp:
                continue
            twin = by_key.get((measurement, scorer, True))
            if twin is not None:
                out[(p.model, p.layers, p.amount, p.finetune_steps, scorer)].append((p.penalty, twin.penalty))
    return out


def share(values) -> str:
    helped = sum(bp < plain for plain, bp in values)
    hurt = sum(bp > plain for plain, bp in values)
    return f"{100 * helped / len(values):.0f} % / {100 * hurt / len(values):.0f} %"


def main(db: str) -> None:
    with Store(db) as store:
        records = store.records(status="done")
    probes = [r for r in records if r.metrics.get("probes")]
    found = pairs(probes)
    scorers = ("rand", "norm", "rs", "abs_rs", "mrs", "abs_mrs")

    print("### Does mean replacement lower the penalty? Share of pairs where it lowers / raises it\n")
    print(
        "One pair = one scorer at one probe (seed × step); the same units are removed with and "
        "without mean replacement. Pairs with equal penalties (e.g. only dead units removed) count "
        "in neither share.\n"
    )
    order = {name: i for i, name in enumerate(LAYER_SETS)}
    models = list(dict.fromkeys(r.model for r in probes))
    settings = sorted(
        {k[:4] for k in found},
        key=lambda k: (models.index(k[0]), order.get(k[1], len(order)), k[1], k[2][0] != "count", k[2][1], k[3]),
    )
    print("| model | layers | amount | fine-tuning steps | " + " | ".join(scorers) + " | all |")
    print("|---|---|---|---:|" + "---:|" * (len(scorers) + 1))
    for setting in settings:
        cells, everything = [], []
        for scorer in scorers:
            values = found.get((*setting, scorer), [])
            everything += values
            cells.append(share(values) if values else "–")
        model, layers, amount, finetune = setting
        print(
            f"| {model} | {layers} | {amount_text(amount)} | {finetune} | "
            + " | ".join(cells)
            + f" | {share(everything)} |"
        )

    print("\n### Median penalty without → with mean replacement, all pairs of a setting\n")
    print("| model | layers | amount | fine-tuning steps | median d | median d_bp | pairs |")
    print("|---|---|---|---:|---:|---:|---:|")
    for setting in settings:
        values = [v for scorer in scorers for v in found.get((*setting, scorer), [])]
        model, layers, amount, finetune = setting
        print(
            f"| {model} | {layers} | {amount_text(amount)} | {finetune} | "
            f"{statistics.median(v[0] for v in values):.4f} | {statistics.median(v[1] for v in values):.4f} | "
            f"{len(values)} |"
        )

    print("\n### Runs\n")
    print("| task | model | runs | seconds per run (mean) | probe seconds per run (mean) | final test accuracy |")
    print("|---|---|---:|---:|---:|---:|")
    groups = defaultdict(list)
    for r in records:
        groups[(r.config["task"], r.model)].append(r)
    for (task, model), rs in sorted(groups.items()):
        seconds = statistics.fmean(r.seconds or 0.0 for r in rs)
        probe = [r.metrics.get("probe_seconds") for r in rs if r.metrics.get("probe_seconds") is not None]
        accuracy = [r.metrics["accuracy"] for r in rs]
        spread = f" ± {statistics.stdev(accuracy):.4f}" if len(accuracy) > 1 else ""
        print(
            f"| {task} | {model} | {len(rs)} | {seconds:.0f} | {statistics.fmean(probe):.0f} |"
            if probe
            else f"| {task} | {model} | {len(rs)} | {seconds:.0f} | – |",
            end="",
        )
        print(f" {statistics.fmean(accuracy):.4f}{spread} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
