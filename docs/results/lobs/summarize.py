"""Extra tables of study C from its store: retraining recovery per method, and the L-OBS
solvers' per-layer predicted vs measured errors.

    python docs/results/lobs/summarize.py results/study-c/study.db > docs/results/lobs/summary.md

Recovery is counted from the last prune (for the iterative runs, recomputed from each run's
stored evaluation curve: runs made before the monitor counted from the last prune stored the
first step of recovery after the first prune).
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from prunelab.store import Store


def last_prune_step(record) -> int:
    schedule = record.config["method"]["schedule"]
    if schedule["name"] == "iterative":
        return schedule.get("start", 0) + (schedule["n_prunes"] - 1) * schedule["every"]
    return 0


def steps_to_recover(record) -> int | None:
    metrics = record.metrics
    target = metrics["accuracy_dense"] - record.config["training"]["retrain_tolerance"]
    start = last_prune_step(record)
    for step, accuracy in metrics["retrain_curve"]:
        if step >= start and accuracy >= target - 1e-12:
            return step - start
    return None


def main(db: str) -> None:
    with Store(db) as store:
        records = store.records(status="done")
    budget = {r.model: r.config["training"]["finetune_epochs"] for r in records}
    batch = {r.config["training"]["batch_size"] for r in records}
    levels = defaultdict(set)  # a method run at several levels (study-c-paper's Table 2) gets a row per level
    for r in records:
        levels[(r.model, r.method)].add(r.sparsity)
    print("### Retraining until within 0.1 % of the dense accuracy (test set, evaluated every 100 steps)\n")
    print("| model | method | recovered | steps (median of recovered) | steps (each seed; – = not within the budget) |")
    print("|---|---|---:|---:|---|")
    cells = defaultdict(list)
    for r in records:
        several = len(levels[(r.model, r.method)]) > 1
        cells[(r.model, r.method + (f" at {100 * r.sparsity:.1f} %" if several else ""))].append(steps_to_recover(r))
    for (model, method), steps in cells.items():
        done = [s for s in steps if s is not None]
        median = f"{statistics.median(done):.0f}" if done else "–"
        each = ", ".join("–" if s is None else str(s) for s in steps)
        print(f"| {model} | {method} | {len(done)}/{len(steps)} | {median} | {each} |")
    print(
        f"\n(fine-tuning budget: {', '.join(f'{m} {e} epochs' for m, e in budget.items())}, batch {'/'.join(map(str, sorted(batch)))})\n"
    )
    print("### Layer-wise errors of the L-OBS solvers right after pruning (mean over seeds)\n")
    print(
        "`‖Ẑ − Z‖/√n` per layer on the 4096 calibration images: predicted by the solver's sensitivities "
        "(damped Hessian) and measured (exact, undamped); relative = `‖Ẑ − Z‖/‖Z‖`.\n"
    )
    print("| model | method | layer | sparsity | predicted | measured | relative | solve s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    rows = defaultdict(list)
    for r in records:
        for report in (r.metrics.get("layer_reports") or [])[:1]:  # the one-shot prune
            if r.config["method"]["schedule"]["name"] != "one-shot":
                continue
            for layer in report:
                rows[(r.model, r.method, layer["layer"])].append(layer)
    for (model, method, layer), entries in rows.items():
        mean = lambda key: statistics.fmean(e[key] for e in entries)  # noqa: B023 (used in this iteration)
        print(
            f"| {model} | {method} | {layer} | {mean('sparsity'):.3f} | {mean('predicted_error'):.4g} | "
            f"{mean('measured_error'):.4g} | {mean('relative_error'):.4f} | {mean('solve_seconds'):.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/study-c/study.db")
