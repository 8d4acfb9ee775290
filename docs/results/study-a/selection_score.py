"""The score that chose study A's L1 and L2 strengths: each method label's mean validation
accuracy (%) over every dataset, level and seed of the selection study, with the per-dataset means.

    python docs/results/study-a/selection_score.py results/study-a-select/study.db

With ``--by-width`` (study-a-long-select, which chooses per dataset and width), one line per
(dataset, width): each method label's mean validation accuracy over that cell's levels and
seeds, the best one marked and named.

    python docs/results/study-a/selection_score.py results/study-a-long-select/study.db --by-width
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

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
    for (dataset, model), methods in cells.items():
        means = {m: statistics.mean(v) for m, v in methods.items()}
        best = max(means, key=lambda m: means[m])
        scores = ", ".join(f"{m} {v:.2f}{' *' if m == best else ''} ({len(methods[m])})" for m, v in means.items())
        print(f"{dataset}/{model}: best {best}; {scores}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "--by-width":
        by_width(sys.argv[1])
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
