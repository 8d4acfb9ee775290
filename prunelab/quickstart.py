"""The quickstart study that ``make run`` runs.

On scikit-learn's 8×8 digits (embedded, works offline), train a 64-100-10 MLP,
prune it by weight magnitude to several sparsities, one-shot (prune the trained
net, fine-tune with masks fixed) and iterative (root schedule, prune 5 times with
training between), and report sparsity, compression ratio, theoretical speedup
and test accuracy — mean ± std over seeds.
"""

from __future__ import annotations

import copy
import csv
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prunelab._version import __version__
from prunelab.data import load_dataset
from prunelab.metrics import summary
from prunelab.models import build_model
from prunelab.pruning import Iterative, Pruner, prune
from prunelab.training import evaluate, fit, steps_per_epoch


@dataclass(frozen=True)
class Budget:
    """Training budget, in epochs, used for every seed and method."""

    batch_size: int = 32
    lr: float = 0.05
    dense_epochs: int = 30          # train the dense net
    finetune_epochs: int = 20       # after pruning (one-shot) / from the first prune (iterative)
    n_prunes: int = 5               # iterative: prunes, 2 epochs apart, root exponent c = 3
    prune_every_epochs: int = 2
    exponent: float = 3.0


SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_quickstart(seeds: int = 3, sparsities=SPARSITIES, budget: Budget = Budget(),
                   progress: bool = False, log=print) -> list[dict]:
    """Run the study; returns one row per (method, sparsity) with means and stds."""
    ds = load_dataset("digits")
    x_test = (ds.x_test, ds.y_test)
    train_kw = dict(batch_size=budget.batch_size, lr=budget.lr, progress=progress)
    per_epoch = steps_per_epoch(len(ds.y_train), budget.batch_size)
    cells: dict[tuple[str, float], dict[str, list[float]]] = {}

    def record(method, target, **values):
        cell = cells.setdefault((method, target), {})
        for key, value in values.items():
            cell.setdefault(key, []).append(value)

    for seed in range(seeds):
        dense = build_model("mlp", dataset=ds, hidden=[100], seed=seed)
        fit(dense, ds, epochs=budget.dense_epochs, seed=seed, **train_kw)
        dense_acc = evaluate(dense, x_test)["accuracy"]
        record("dense", 0.0, accuracy=dense_acc, pruned_accuracy=dense_acc, **_size(dense, ds))
        log(f"seed {seed}: dense accuracy {dense_acc:.4f}")
        for sparsity in sparsities:
            model = copy.deepcopy(dense)
            pruner = prune(model, sparsity, criterion="magnitude")
            right_after = evaluate(model, x_test)["accuracy"]
            fit(model, ds, epochs=budget.finetune_epochs, seed=seed, pruner=pruner, **train_kw)
            record("one-shot", sparsity, accuracy=evaluate(model, x_test)["accuracy"],
                   pruned_accuracy=right_after, **_size(model, ds))

            model = copy.deepcopy(dense)
            schedule = Iterative(sparsity, n_prunes=budget.n_prunes, exponent=budget.exponent,
                                 every=budget.prune_every_epochs * per_epoch)
            pruner = Pruner(model, schedule=schedule, criterion="magnitude")
            fit(model, ds, epochs=budget.finetune_epochs, seed=seed, pruner=pruner, **train_kw)
            record("iterative", sparsity, accuracy=evaluate(model, x_test)["accuracy"],
                   pruned_accuracy=float("nan"), **_size(model, ds))
        log(f"seed {seed}: {len(sparsities)} sparsities x 2 methods done")

    rows = []
    for (method, sparsity), cell in cells.items():
        acc, acc_std = _mean_std(cell["accuracy"])
        rows.append({
            "method": method, "target_sparsity": sparsity,
            "sparsity": statistics.fmean(cell["sparsity"]),
            "compression": statistics.fmean(cell["compression"]),
            "speedup": statistics.fmean(cell["speedup"]),
            "accuracy_pruned": statistics.fmean(cell["pruned_accuracy"]),
            "accuracy": acc, "accuracy_std": acc_std, "seeds": len(cell["accuracy"]),
        })
    rows.sort(key=lambda r: (r["target_sparsity"], r["method"] != "one-shot"))
    return rows


def _size(model, ds) -> dict[str, float]:
    total = summary(model, ds.input_shape).total
    return {"sparsity": total.sparsity, "compression": total.compression, "speedup": total.speedup}


def to_markdown(rows: list[dict]) -> str:
    lines = ["| method | sparsity | compression | theoretical speedup | accuracy right after prune | "
             "accuracy after fine-tuning (mean ± std) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        pruned = "—" if r["accuracy_pruned"] != r["accuracy_pruned"] else f"{r['accuracy_pruned']:.4f}"
        lines.append(f"| {r['method']} | {r['sparsity']:.3f} | {r['compression']:.1f}× | "
                     f"{r['speedup']:.1f}× | {pruned} | {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} |")
    return "\n".join(lines)


def save(rows: list[dict], out: Path, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "quickstart.md", out / "quickstart.csv", out / "quickstart.json"]
    paths[0].write_text(f"# prunelab quickstart\n\n{meta['description']}\n\n{to_markdown(rows)}\n\n"
                        f"prunelab {meta['prunelab']}, torch {meta['torch']}, {meta['machine']}; "
                        f"{meta['seconds']:.1f} s.\n")
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths[2].write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return paths


def main(out: str = "results/quickstart", seeds: int = 3, progress: bool = False) -> list[dict]:
    budget = Budget()
    description = (
        f"Dataset: scikit-learn digits (1437 train / 360 test, 8×8). Model: MLP 64-100-10. "
        f"Dense: {budget.dense_epochs} epochs SGD (lr {budget.lr}, momentum 0.9, batch {budget.batch_size}). "
        f"One-shot: magnitude pruning of the trained net, then {budget.finetune_epochs} epochs with masks. "
        f"Iterative: {budget.n_prunes} magnitude prunes on the root schedule S·(i/k)^(1/{budget.exponent:g}), "
        f"{budget.prune_every_epochs} epochs apart, {budget.finetune_epochs} epochs in all. "
        f"Mean ± std over {seeds} seeds; compression = all parameters / non-zero parameters; "
        f"speedup = dense FLOPs / remaining FLOPs.")
    print(description, flush=True)
    started = time.perf_counter()
    rows = run_quickstart(seeds=seeds, budget=budget, progress=progress)
    meta = {"description": description, "prunelab": __version__, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "seconds": time.perf_counter() - started, "seeds": seeds}
    print()
    print(to_markdown(rows))
    paths = save(rows, Path(out), meta)
    print(f"\n{meta['seconds']:.1f} s; saved {', '.join(str(p) for p in paths)}")
    return rows
