"""Study C at the L-OBS paper's protocol (``experiments/study-c-paper.yaml``): test error tables, as the
paper reports them, from the study's store, followed by ``summarize.py``'s recovery and layer-error
tables.

    python docs/results/lobs/summarize_paper.py results/study-c-paper/study.db > docs/results/lobs/paper/summary.md

Test error = 100 − test accuracy, in %, mean ± standard deviation over the seeds. "510 it." and
"740 it." are the errors 510 and 740 retraining iterations (batch 100) after the last prune; "3000 it."
is after the 5 retraining epochs. Recovery: iterations until the test error is back within 0.1 % of
the dense model's (evaluated every 100 iterations, counted from the last prune).
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from prunelab.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parent))
import summarize  # noqa: E402 (the folder's own script, beside this one)

MODELS = {"lenet-300-100": "LeNet-300-100", "lenet5": "LeNet-5"}
ONE_SHOT = ["random", "magnitude", "OBD", "L-OBS", "L-OBS sequential", "OBS-exact", "OBS-fast"]


def error(values: list[float]) -> str:
    errors = [100 * (1 - v) for v in values]
    if len(errors) == 1:
        return f"{errors[0]:.2f}"
    return f"{statistics.fmean(errors):.2f} ± {statistics.stdev(errors):.2f}"


def recovery(records) -> str:
    steps = [summarize.steps_to_recover(r) for r in records]
    done = sorted(s for s in steps if s is not None)
    return f"{len(done)}/{len(steps)}" + (f", {statistics.median(done):.0f}" if done else "")


def kept(record) -> float:
    """The percentage of the pruned layers' weights kept (from the run's final sparsity)."""
    return 100 * (1 - record.metrics["sparsity"])


def column(records, key: str) -> str:
    return error([r.metrics[key] for r in records])


def main(db: str) -> None:
    with Store(db) as store:
        records = store.records(status="done")
    cells = defaultdict(list)
    for r in records:
        cells[(r.model, r.method, round(r.sparsity, 6))].append(r)
    models = [m for m in MODELS if any(key[0] == m for key in cells)]

    print("# Study C at the L-OBS paper's protocol: summary\n")
    print(__doc__.split("\n\n", 2)[2].strip() + "\n")
    print("## One-shot pruning to the paper's per-layer fractions\n")
    for model in models:
        dense = [r.metrics["accuracy_dense"] for r in records if r.model == model]
        print(f"### {MODELS[model]} (dense test error {error(dense)} %)\n")
        print("| method | right after pruning | 510 it. | 740 it. | 3000 it. | recovered, median iterations |")
        print("|---|---:|---:|---:|---:|---:|")
        for method in ONE_SHOT:
            group = [r for key, rs in cells.items() if key[:2] == (model, method) for r in rs]
            if not group:
                continue
            print(
                f"| {method} | {column(group, 'accuracy_pruned')} | {column(group, 'accuracy_at_510')} | "
                f"{column(group, 'accuracy_at_740')} | {column(group, 'accuracy')} | {recovery(group)} |"
            )
        print()

    print("## Iterative L-OBS (two prunes, 500 iterations apart)\n")
    print(
        "| model | kept % | after the first prune | after the last prune | 510 it. | 740 it. | 3000 it. | "
        "recovered, median iterations |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for model in models:
        group = [r for key, rs in cells.items() if key[:2] == (model, "iterative L-OBS") for r in rs]
        if group:
            print(
                f"| {MODELS[model]} | {statistics.fmean(kept(r) for r in group):.2f} | "
                f"{column(group, 'accuracy_pruned')} | {column(group, 'accuracy_last_prune')} | "
                f"{column(group, 'accuracy_at_510')} | {column(group, 'accuracy_at_740')} | "
                f"{column(group, 'accuracy')} | {recovery(group)} |"
            )
    print()

    table2 = [key for key in cells if key[1].startswith("fc2: ")]
    if table2:
        print("## The paper's Table 2: LeNet-300-100's fc2 alone\n")
        print(
            "| fc2 kept % | method | right after pruning | 510 it. | 740 it. | 3000 it. | recovered, median iterations |"
        )
        print("|---:|---|---:|---:|---:|---:|---:|")
        order = {"magnitude": 0, "OBD": 1, "L-OBS": 2, "OBS-exact": 3}
        table2.sort(key=lambda k: (k[2], order.get(k[1].removeprefix("fc2: "), 9)))
        for key in table2:
            group = cells[key]
            print(
                f"| {100 * (1 - key[2]):.1f} | {key[1].removeprefix('fc2: ')} | {column(group, 'accuracy_pruned')} | "
                f"{column(group, 'accuracy_at_510')} | {column(group, 'accuracy_at_740')} | "
                f"{column(group, 'accuracy')} | {recovery(group)} |"
            )
        print()
    summarize.main(db)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
