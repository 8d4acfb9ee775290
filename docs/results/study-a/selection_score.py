"""The score that chose study A's L1 and L2 strengths: each method label's mean validation
accuracy (%) over every dataset, level and seed of the selection study, with the per-dataset means.

    python docs/results/study-a/selection_score.py results/study-a-select/study.db

With ``--by-width`` (study-a-long-select, which chooses per dataset and width), a markdown table
with one row per (dataset, width): each strength's mean validation accuracy over that cell's
levels and seeds, the best in bold and named.

    python docs/results/study-a/selection_score.py results/study-a-long-select/study.db --by-width \
        > docs/results/study-a/long-select/selection.md
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from prunelab.store import Store


def main(db: str) -> None:
    with Store(db) as store:
        records = store.records(status="done")  # the runs of the spec as last run
    overall: dict[str, list[float]] = defaultdict(list)
    per_dataset: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        overall[r.method].append(100 * r.metrics["val_accuracy"])
        per_dataset[r.method][r.dataset].append(100 * r.metrics["val_accuracy"])
    for method in overall:
        cells = " ".join(f"{d} {statistics.mean(v):.2f}" for d, v in per_dataset[method].items())
        print(f"{method}: {statistics.mean(overall[method]):.2f} over {len(overall[method])} runs ({cells})")


def by_width(db: str) -> None:
    with Store(db) as store:
        records = store.records(status="done")
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[(r.dataset, r.model)][r.method].append(100 * r.metrics["val_accuracy"])
    labels = sorted({m for methods in cells.values() for m in methods}, key=_strength)
    print(f"# {Path(db).name}: the L1 strength per dataset and width\n")
    print("Mean validation accuracy (%) over each cell's levels and seeds (runs in brackets); the best in bold.\n")
    print("| dataset | width | " + " | ".join(_short(m) for m in labels) + " | chosen |")
    print("|---|---|" + "---:|" * len(labels) + "---|")
    for (dataset, model), methods in cells.items():
        means = {m: statistics.mean(v) for m, v in methods.items()}
        best = max(means, key=lambda m: means[m])
        row = []
        for m in labels:
            if m not in means:
                row.append("—")
                continue
            value = f"{means[m]:.2f}"
            row.append(f"**{value}** ({len(methods[m])})" if m == best else f"{value} ({len(methods[m])})")
        print(f"| {dataset} | {model} | " + " | ".join(row) + f" | {_short(best)} |")


def _strength(label: str) -> float:
    """The strength in a grid label such as ``MagL1[strength=0.001]`` (labels without one last)."""
    match = re.search(r"strength=([0-9.eE+-]+)", label)
    return float(match.group(1)) if match else math.inf


def _short(label: str) -> str:
    value = _strength(label)
    return f"{value:g}" if math.isfinite(value) else label


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "--by-width":
        by_width(sys.argv[1])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
