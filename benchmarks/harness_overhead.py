"""Harness overhead: what running a study costs beyond the runs' own compute.

A study of ``--runs`` tiny runs (64-8-10 MLP on the embedded digits data, a few
optimiser steps each) is run three times into fresh stores:

* 1 local worker (in-process): harness time per run = (wall time − Σ run seconds) / runs,
  where a run's seconds are measured inside ``execute_run`` around the task. This covers
  planning and validation of the spec, store writes (one SQLite transaction with fsync
  per state change), progress and scheduling. Target: under 50 ms per run.
* 2 local workers (processes): the same study; speedup = wall(1 worker) / wall(2 workers).
  The runs are tiny, so this is the worst case for process overhead (spawning the
  workers is included in the wall time).

    python benchmarks/harness_overhead.py [--runs 200] [--epochs 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import torch

import prunelab
from prunelab.experiments import Store, build_study, run_study


def spec(runs: int, epochs: int) -> dict:
    """``runs`` distinct runs: 10 sparsities x (runs / 10) seeds; 320 training images at
    batch 8 = 40 optimiser steps per epoch."""
    seeds = max(1, runs // 10)
    return {
        "name": "harness-bench",
        "datasets": [{"name": "digits", "subset": {"n_train": 320, "n_test": 200}}],
        "models": [{"name": "mlp", "hidden": [8]}],
        "methods": [{"label": "magnitude"}],
        "sparsities": [round(0.05 + 0.09 * i, 2) for i in range(10)],
        "seeds": seeds,
        "training": {"epochs": epochs, "finetune_epochs": epochs, "batch_size": 8},
    }


def measure(study, workers: int, folder: Path) -> dict:
    db = folder / f"w{workers}" / "study.db"
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the per-run log lines
        result = run_study(study, db, workers=workers, progress=False)
    wall = time.perf_counter() - started
    with Store(db) as store:
        records = store.records()
    compute = sum(r.seconds for r in records)
    if result.counts["done"] != len(study.runs):
        raise RuntimeError(f"{workers} workers: only {result.counts['done']} of {len(study.runs)} runs done")
    return {"wall": wall, "compute": compute, "runs": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument(
        "--epochs", type=int, default=1, help="epochs (of 40 steps) of dense training and of fine-tuning per run"
    )
    args = parser.parse_args()

    plan_started = time.perf_counter()
    study = build_study(spec(args.runs, args.epochs))
    plan = time.perf_counter() - plan_started
    with tempfile.TemporaryDirectory() as tmp:
        one = measure(study, 1, Path(tmp))
        two = measure(study, 2, Path(tmp))
    n = one["runs"]
    overhead_ms = (one["wall"] - one["compute"]) / n * 1000
    print(
        f"prunelab {prunelab.__version__}, torch {torch.__version__}; {n} runs of a 64-8-10 MLP on digits "
        f"({40 * args.epochs} steps per phase); spec planned and validated in {plan * 1000:.0f} ms\n"
    )
    print(f"{'configuration':<16} {'wall s':>8} {'run compute s':>14} {'harness ms/run':>15} {'speedup':>8}")
    print(f"{'1 worker':<16} {one['wall']:8.2f} {one['compute']:14.2f} {overhead_ms:15.1f} {1.0:7.2f}x")
    print(f"{'2 workers':<16} {two['wall']:8.2f} {two['compute']:14.2f} {'':>15} {one['wall'] / two['wall']:7.2f}x")
    print(f"\ntarget: harness time under 50 ms per run locally -> {'met' if overhead_ms < 50 else 'NOT met'}")


if __name__ == "__main__":
    main()
