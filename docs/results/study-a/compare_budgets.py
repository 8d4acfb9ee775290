"""Study A's two training budgets side by side: test accuracy (%), mean ± std over seeds, of each
method of the long study (study-a-long, 230 epochs) at each of its (dataset, width, level) cells,
next to the same cell of study A (15 epochs; "—" where study A has no such run). One markdown
table per (dataset, width); the regulariser strengths each store used are listed under it.

    python docs/results/study-a/compare_budgets.py results/study-a/study.db results/study-a-long/study.db
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from prunelab.store import Store

Cells = dict[tuple[str, str, str, float], list[float]]


def _cells(db: str) -> tuple[Cells, dict[tuple[str, str, str], set]]:
    cells: Cells = defaultdict(list)
    strengths: dict[tuple[str, str, str], set] = defaultdict(set)
    with Store(db) as store:
        for r in store.records(status="done"):  # the runs of the spec as last run
            cells[(r.dataset, r.model, r.method, round(r.sparsity, 6))].append(100 * r.metrics["accuracy"])
            regularizer = r.config.get("method", {}).get("regularizer")
            if regularizer:
                strengths[(r.dataset, r.model, r.method)].add(f"{regularizer['name']} {regularizer['strength']:g}")
    return cells, strengths


def _show(values: list[float] | None) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}" + ("" if len(values) == 5 else f" ({len(values)})")


def main(short_db: str, long_db: str) -> None:
    short, short_strengths = _cells(short_db)
    long, long_strengths = _cells(long_db)
    blocks: dict[tuple[str, str], dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for dataset, model, method, level in long:
        blocks[(dataset, model)][method].add(level)
    for (dataset, model), methods in blocks.items():
        levels = sorted(set().union(*methods.values()))
        print(f"\n### {dataset}, {model}: 15 epochs (study A) | 230 epochs (study-a-long)\n")
        print("| level | " + " | ".join(f"{m} 15 ep | {m} 230 ep" for m in methods) + " |")
        print("|---:|" + "---:|---:|" * len(methods))
        for level in levels:
            row = [
                f"{_show(short.get((dataset, model, m, level)))} | {_show(long.get((dataset, model, m, level)))}"
                for m in methods
            ]
            print(f"| {100 * level:g} % | " + " | ".join(row) + " |")
        notes = [
            f"{m}: {', '.join(sorted(short_strengths.get((dataset, model, m), {'—'})))} (15 ep), "
            f"{', '.join(sorted(long_strengths.get((dataset, model, m), {'—'})))} (230 ep)"
            for m in methods
            if (dataset, model, m) in long_strengths
        ]
        if notes:
            print("\nStrengths: " + "; ".join(notes) + ".")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
