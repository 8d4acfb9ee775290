"""The score that chose study A's L1 and L2 strengths: each method label's mean validation
accuracy (%) over every dataset, level and seed of the selection study, with the per-dataset means.

    python docs/results/study-a/selection_score.py results/study-a-select/study.db
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from prunelab.experiments.store import Store


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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
