"""Study E's sparse execution and granularity at equal compression (issue 20, point 4), from the stores
of ``experiments/study-e-latency.yaml`` and ``experiments/study-e-equal.yaml``.

    python docs/results/study-e/sparse_execution.py results/study-e-latency/study.db \\
        results/study-e-equal/study.db > docs/results/study-e/sparse_execution.md

Every latency here comes from ``prunelab.inference_latency`` run by the prune task on the final model:
the model as it is (zeros stored and multiplied, "dense"), with every Linear layer at 40 % sparsity or
more as a CSR ``SparseLinear`` ("CSR"), and physically thinned ("thinned"), timed in 15 interleaved
rounds (the order reversed every other round) on one torch thread, the median over rounds of each
round's median of 10 calls. Speedups are dense ms over the variant's ms, from the same rounds.
"""

from __future__ import annotations

import platform
import statistics
import sys
from collections import defaultdict

from prunelab.store import Store

MODELS = {"lenet-300-100": "LeNet-300-100", "lenet5": "LeNet-5"}


def level(record) -> str:
    return f"{100 * record.sparsity:g} %"


def ms(record, variant: str, batch: int) -> float:
    return record.metrics["latency"]["median_ms"][variant][str(batch)]


def speedup(record, variant: str, batch: int) -> float:
    return ms(record, "dense", batch) / ms(record, variant, batch)


def design(record) -> tuple[str, str, str]:
    method = record.config["method"]
    schedule = method["schedule"]["name"]
    criterion = method["criterion"]["name"] if isinstance(method["criterion"], dict) else method["criterion"]
    return schedule, criterion, method["scope"]


def replaced(record) -> str:
    layers = record.metrics["latency"]["sparse"]["layers"]
    return ", ".join(f"{d['name']} {100 * d['sparsity']:.0f}" for d in layers if d["replaced"]) or "none"


def mean_std(values: list[float], fmt: str = "{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def latency_tables(records) -> None:
    print("## CSR execution of the weight-granular design points (`experiments/study-e-latency.yaml`)\n")
    print(
        "One seed. Latency in ms of the final model at batch 1 and 64; `CSR ×` and `thinned ×` are "
        "speedups over the same model with its zeros stored, measured in the same interleaved rounds. "
        "`CSR layers` lists the Linear layers run as CSR with their sparsity in % (LeNet-5's "
        "convolutions always run dense).\n"
    )
    by_model = defaultdict(list)
    for r in records:
        by_model[r.model].append(r)
    for model, rows in by_model.items():
        print(f"### {MODELS.get(model, model)}\n")
        print(
            "| level | schedule | criterion | scope | compression | dense ms b1 | CSR × b1 | dense ms b64 | "
            "CSR × b64 | thinned × b64 | CSR layers |"
        )
        print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|")
        for r in sorted(rows, key=lambda r: (r.sparsity, design(r)[2], design(r)[0], design(r)[1])):
            schedule, criterion, scope = design(r)
            print(
                f"| {level(r)} | {schedule} | {criterion} | {scope} | {r.metrics['compression']:.2f}× | "
                f"{ms(r, 'dense', 1):.4f} | {speedup(r, 'sparse', 1):.2f}× | {ms(r, 'dense', 64):.3f} | "
                f"{speedup(r, 'sparse', 64):.2f}× | {speedup(r, 'thinned', 64):.2f}× | {replaced(r)} |"
            )
        print()
        print(
            f"**{MODELS.get(model, model)}, by scope and level** (mean and range over its schedule × criterion points):\n"
        )
        print("| level | scope | CSR × b1 | CSR × b64 | thinned × b64 |")
        print("|---:|---|---:|---:|---:|")
        groups = defaultdict(list)
        for r in rows:
            groups[(r.sparsity, design(r)[2])].append(r)
        for (_, scope), group in sorted(groups.items()):

            def cell(variant: str, batch: int, group=group) -> str:
                values = [speedup(r, variant, batch) for r in group]
                return f"{statistics.fmean(values):.2f}× ({min(values):.2f}–{max(values):.2f})"

            print(
                f"| {level(group[0])} | {scope} | {cell('sparse', 1)} | {cell('sparse', 64)} | {cell('thinned', 64)} |"
            )
        print()


def equal_tables(records) -> None:
    print("## Granularity at equal compression (`experiments/study-e-equal.yaml`)\n")
    print(
        "LeNet-5, conv1 and conv2 pruned (one-shot, magnitude, local), fc1 and fc2 dense: every granularity "
        "removes the same number of weights at a level. Mean ± std over the seeds; `thinned ×` is the "
        "thinned model's speedup over the same model with its zeros stored, interleaved rounds, one thread.\n"
    )
    dense = [r.metrics["accuracy_dense"] for r in records]
    print(f"Dense accuracy: {100 * statistics.fmean(dense):.2f} % (mean over the runs' seeds).\n")
    print(
        "| level | granularity | seeds | accuracy % | compression | theoretical speedup | thinned × b1 | "
        "thinned × b64 | filters left (conv1, conv2) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    groups = defaultdict(list)
    for r in records:
        groups[(r.sparsity, r.config["method"]["granularity"])].append(r)
    order = {"weight": 0, "kernel": 1, "filter": 2}
    for (_, granularity), group in sorted(groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 9))):
        units = defaultdict(list)
        for r in group:
            for name, (_, after) in r.metrics["latency"]["thinned_units"].items():
                units[name].append(after)
        left = ", ".join(f"{statistics.fmean(v):.1f}" for name, v in units.items() if name in ("conv1", "conv2"))
        print(
            f"| {level(group[0])} | {granularity} | {len(group)} | "
            f"{mean_std([100 * r.metrics['accuracy'] for r in group])} | "
            f"{statistics.fmean(r.metrics['compression'] for r in group):.3f}× | "
            f"{statistics.fmean(r.metrics['speedup'] for r in group):.2f}× | "
            f"{mean_std([speedup(r, 'thinned', 1) for r in group])}× | "
            f"{mean_std([speedup(r, 'thinned', 64) for r in group])}× | {left} |"
        )
    print()


def main(latency_db: str, equal_db: str) -> None:
    print("# Study E: sparse execution and granularity at equal compression\n")
    print(
        f"Generated by `docs/results/study-e/sparse_execution.py` ({platform.machine()}, Python {platform.python_version()}).\n"
    )
    with Store(latency_db) as store:
        latency_tables(store.records(status="done"))
    with Store(equal_db) as store:
        equal_tables(store.records(status="done"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
