"""Study A's comparison at equal size, from its store: per dataset and network, which method is
best at each level, and how the pruned / hashed MLPs compare with the conv baselines' Pareto
front of (non-zero parameters, accuracy).

    python docs/results/study-a/summarize.py results/study-a/study.db > docs/results/study-a/summary.md

Each cell is the mean over seeds. "conv front at or below" is the most accurate conv baseline
with at most as many parameters as the MLP's mean non-zeros (the conv nets are dense), or "-"
when every conv net is larger.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from prunelab.experiments.analysis import pareto_front
from prunelab.experiments.store import Store

MLPS = ("h100", "h30")


def main(db: str) -> None:
    with Store(db) as store:
        records = [r for r in store.records(status="done") if r.in_spec]
    groups: dict[tuple, list] = defaultdict(list)
    for r in records:
        groups[(r.dataset, r.model, r.method, r.sparsity)].append(r.metrics)
    datasets = list(dict.fromkeys(r.dataset for r in records))
    print(f"# Study A summary ({len(records)} finished runs)\n")
    for dataset in datasets:
        conv = [
            (statistics.mean(m["nonzero_params"] for m in ms), statistics.mean(m["accuracy"] for m in ms), model)
            for (d, model, method, _), ms in groups.items()
            if d == dataset and method == "conv"
        ]
        front = [conv[i] for i in pareto_front([(p, a) for p, a, _ in conv])]
        print(f"## {dataset}\n")
        if front:
            print(
                "Conv Pareto front: "
                + ", ".join(f"{model} {p:,.0f} params {100 * a:.2f} %" for p, a, model in front)
                + "\n"
            )
        for net in MLPS:
            levels = sorted({s for (d, model, _, s) in groups if d == dataset and model == net})
            methods = sorted({x for (d, model, x, _) in groups if d == dataset and model == net})
            if not levels:
                continue
            print(f"### {net}\n")
            print("| sparsity | non-zeros | " + " | ".join(methods) + " | best | conv front at or below |")
            print("|---:|---:|" + "---:|" * len(methods) + "---|---|")
            for level in levels:
                cells, best, nonzero = [], None, []
                for method in methods:
                    ms = groups.get((dataset, net, method, level), [])
                    if not ms:
                        cells.append("–")
                        continue
                    accuracy = statistics.mean(m["accuracy"] for m in ms)
                    nonzero.append(statistics.mean(m["nonzero_params"] for m in ms))
                    spread = f" ± {100 * statistics.stdev(m['accuracy'] for m in ms):.2f}" if len(ms) > 1 else ""
                    cells.append(f"{100 * accuracy:.2f}{spread}")
                    if best is None or accuracy > best[0]:
                        best = (accuracy, method)
                size = statistics.mean(nonzero) if nonzero else float("nan")
                below = [point for point in front if point[0] <= size]
                conv_cell = f"{below[-1][2]}: {100 * below[-1][1]:.2f}" if below else "-"
                print(
                    f"| {100 * level:g} % | {size:,.0f} | "
                    + " | ".join(cells)
                    + f" | {best[1] if best else '-'} | {conv_cell} |"
                )
            print()
            layer_split(groups, dataset, net, levels, methods)


def layer_split(groups, dataset: str, net: str, levels, methods) -> None:
    """How each pruning method shares the level between the hidden and the output layer:
    ``fc1 / fc2`` sparsity (%), and ``accuracy_pruned``: the accuracy after the prune events at
    the start of fine-tuning, before any retraining (L-OBS's one prune; only the first event of
    the gradual schedules, AGP's at sparsity 0). Means over seeds; HashedNet has neither."""
    pruned = [m for m in methods if any("layer_sparsity" in x for x in groups.get((dataset, net, m, levels[-1]), []))]
    if not pruned:
        return
    print(
        f"{net}: fc1 / fc2 sparsity (%) | accuracy after the events at the start of fine-tuning, "
        f"before retraining (%): L-OBS's one prune, a gradual schedule's first event\n"
    )
    print("| sparsity | " + " | ".join(pruned) + " |")
    print("|---:|" + "---:|" * len(pruned))
    for level in levels:
        cells = []
        for method in pruned:
            ms = [m for m in groups.get((dataset, net, method, level), []) if "layer_sparsity" in m]
            if not ms:
                cells.append("–")
                continue
            fc1, fc2 = (statistics.mean(m["layer_sparsity"][k] for m in ms) for k in ("fc1.weight", "fc2.weight"))
            after = [m["accuracy_pruned"] for m in ms if m.get("accuracy_pruned") is not None]
            cells.append(
                f"{100 * fc1:.1f} / {100 * fc2:.1f}" + (f" \\| {100 * statistics.mean(after):.1f}" if after else "")
            )
        print(f"| {100 * level:g} % | " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/study-a/study.db")
