"""Study D's comparison tables from its store: the dense width family against the widest model
pruned with AGP, at equal non-zeros, per scope; the storage of the pruned models; and per run
group the per-layer sparsity and the last epoch's training accuracy.

    python docs/results/study-d/summarize.py results/study-d/study.db > docs/results/study-d/summary.md
    python docs/results/study-d/summarize.py results/study-d-conv/study.db > docs/results/study-d/summary-conv.md

For each pruned level the table also gives the dense network of the family whose parameter
count is nearest below the pruned model's non-zeros, and the accuracy difference.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from prunelab.experiments.store import Store


def mean_std(values: list[float], scale: float = 1.0) -> str:
    if len(values) == 1:
        return f"{scale * values[0]:.2f}"
    return f"{scale * statistics.mean(values):.2f} ± {scale * statistics.stdev(values):.2f}"


def main(db: str) -> None:
    with Store(db) as store:
        records = store.records(status="done")
    runs = defaultdict(list)  # (dataset, model, method, sparsity) -> metrics
    for r in records:
        runs[(r.dataset, r.model, r.method, r.sparsity)].append(r.metrics)
    datasets = sorted({key[0] for key in runs})
    print(f"# Study D summary ({len(records)} finished runs)\n")
    for dataset in datasets:
        dense = sorted(
            (
                (statistics.mean(m["nonzero_params"] for m in ms), model, ms)
                for (d, model, method, _), ms in runs.items()
                if d == dataset and method == "dense"
            )
        )
        print(f"## {dataset}\n")
        print("| dense model | parameters | accuracy % |")
        print("|---|---:|---:|")
        for params, model, ms in dense:
            print(f"| {model} | {params:,.0f} | {mean_std([m['accuracy'] for m in ms], 100)} |")
        print()
        print("| scope | sparsity | non-zeros | accuracy % | dense at or below | its accuracy % | difference |")
        print("|---|---:|---:|---:|---|---:|---:|")
        pruned = sorted(
            (method, s, ms) for (d, model, method, s), ms in runs.items() if d == dataset and method != "dense"
        )
        for method, sparsity, ms in pruned:
            nonzero = statistics.mean(m["nonzero_params"] for m in ms)
            accuracy = [m["accuracy"] for m in ms]
            below = [row for row in dense if row[0] <= nonzero]
            if below:
                params, model, dms = below[-1]
                dense_accuracy = statistics.mean(m["accuracy"] for m in dms)
                cells = (
                    f"{model} ({params:,.0f})",
                    mean_std([m["accuracy"] for m in dms], 100),
                    f"{100 * (statistics.mean(accuracy) - dense_accuracy):+.2f}",
                )
            else:
                cells = ("none smaller", "-", "-")
            print(
                f"| {method.removeprefix('AGP-')} | {100 * sparsity:g} % | {nonzero:,.0f} | "
                f"{mean_std(accuracy, 100)} | {' | '.join(cells)} |"
            )
        print()
    pruned_models = ", ".join(sorted({model for (_, model, method, _) in runs if method != "dense"}))
    print(
        f"## Storage of the pruned {pruned_models} (bytes, float32, 4-bit CSR indices; mean over scopes, "
        f"datasets and seeds)\n"
    )
    print("| sparsity | dense | bit-mask | CSR | best | best / dense |")
    print("|---:|---:|---:|---:|---:|---:|")
    levels = sorted({s for (_, _, method, s) in runs if method != "dense"})
    for sparsity in levels:
        ms = [m for (_, _, method, s), group in runs.items() if method != "dense" and s == sparsity for m in group]
        dense_b, mask_b, csr_b = (
            statistics.mean(m[k] for m in ms) for k in ("bytes_dense", "bytes_bitmask", "bytes_csr")
        )
        best = statistics.mean(m["bytes_best"] for m in ms)  # each tensor in its own best format
        print(
            f"| {100 * sparsity:g} % | {dense_b:,.0f} | {mask_b:,.0f} | {csr_b:,.0f} | {best:,.0f} | {best / dense_b:.1%} |"
        )

    print("\n## Where the zeros go, and the last epoch's training accuracy (mean over seeds)\n")
    layer_names = list(dict.fromkeys(name for r in records for name in r.metrics.get("layer_sparsity", {})))
    print("| dataset | model | method | sparsity | " + " | ".join(layer_names) + " | training accuracy % |")
    print("|---|---|---|---:|" + "---:|" * len(layer_names) + "---:|")
    cells = defaultdict(list)
    for r in records:
        cells[(r.dataset, r.model, r.method, r.sparsity)].append(r)
    for (dataset, model, method, sparsity), group in sorted(cells.items()):
        per_layer = [
            statistics.mean(100 * r.metrics["layer_sparsity"].get(name, 0.0) for r in group)
            if method != "dense"
            else 0.0
            for name in layer_names
        ]
        train = statistics.mean(100 * r.curve[-1]["train_accuracy"] for r in group)
        print(
            f"| {dataset} | {model} | {method} | {100 * sparsity:g} % | "
            + " | ".join(f"{v:.1f}" for v in per_layer)
            + f" | {train:.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/study-d/study.db")
