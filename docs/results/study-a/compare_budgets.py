"""Study A's two training budgets side by side: test accuracy (%), mean ± std over seeds, of each
method of the long study (study-a-long, 230 epochs) at each of its (dataset, width, level) cells,
next to the same cell at study A's budget (15 epochs; "—" where no short run has that cell). One
markdown table per (dataset, width); the regulariser strengths each store used are listed under it,
and a second table gives how the long study's runs split the kept weights between the two layers
(mean over seeds, from each record's ``layer_sparsity``; 784 inputs and 10 classes, as in study A),
beside the short budget's split where a short-budget store recorded it.
With ``--figure PATH`` it also draws one panel per (dataset, width): mean test accuracy against the
level, each method's 230-epoch line solid and its 15-epoch line dashed, the seeds' std as a band.

The short budget comes from one or more sources, the first that has a cell wins: a study store, or
a folder of study A's committed tables (``accuracy-sparsity-by-dataset-<method>-<model>.csv``,
mean, std and n per cell; they carry no strengths: study A's are in experiments/study-a.yaml).
The last argument is the long study's store.

    python docs/results/study-a/compare_budgets.py docs/results/study-a/tables \
        docs/results/study-a/h30-levels/study-a-h30-levels.db results/study-a-long/study.db \
        [--figure docs/results/study-a/figures/budgets.png]
"""

from __future__ import annotations

import csv
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from prunelab.store import Store

Cells = dict[tuple[str, str, str, float], list[float]]
Summary = tuple[float, float, int]  # mean, std, n (accuracy in %)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _table_cells(folder: Path, methods: set[tuple[str, str]]) -> dict[tuple[str, str, str, float], Summary]:
    """Cells of study A's committed tables for the (method, model) pairs asked for."""
    out: dict[tuple[str, str, str, float], Summary] = {}
    for method, model in methods:
        path = folder / f"accuracy-sparsity-by-dataset-{_slug(method)}-{_slug(model)}.csv"
        if not path.exists():
            continue
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                level = round(float(row["sparsity"]), 6)
                for column in row:
                    if not column.endswith(" mean") or not row[column]:
                        continue
                    dataset = column[: -len(" mean")]
                    std = row.get(f"{dataset} std") or "nan"
                    n = int(row.get(f"{dataset} n") or 0)
                    out[(dataset, model, method, level)] = (100 * float(row[column]), 100 * float(std), n)
    return out


def _sizes(config: dict) -> tuple[int, ...]:
    """Weights per layer of a record's 784-h-10 MLP."""
    widths = [784, *config["model"]["options"]["hidden"], 10]
    return tuple(a * b for a, b in zip(widths, widths[1:]))


def _kept(config: dict, layer_sparsity: dict) -> tuple[float, ...]:
    """Weights kept per layer of a 784-h-10 MLP record, from its per-layer sparsity."""
    return tuple((1 - layer_sparsity[f"fc{i + 1}.weight"]) * size for i, size in enumerate(_sizes(config)))


def _cells(
    db: str, kept: dict | None = None, sizes: dict | None = None
) -> tuple[Cells, dict[tuple[str, str, str], set]]:
    cells: Cells = defaultdict(list)
    strengths: dict[tuple[str, str, str], set] = defaultdict(set)
    with Store(db) as store:
        for r in store.records(status="done"):  # the runs of the spec as last run
            key = (r.dataset, r.model, r.method, round(r.sparsity, 6))
            cells[key].append(100 * r.metrics["accuracy"])
            if kept is not None and "layer_sparsity" in r.metrics:
                kept.setdefault(key, []).append(_kept(r.config, r.metrics["layer_sparsity"]))
                if sizes is not None:
                    sizes.setdefault((r.dataset, r.model), _sizes(r.config))
            regularizer = r.config.get("method", {}).get("regularizer")
            if regularizer:
                strengths[(r.dataset, r.model, r.method)].add(f"{regularizer['name']} {regularizer['strength']:g}")
    return cells, strengths


def _summary(values: list[float]) -> Summary:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _show(cell: Summary | None) -> str:
    if cell is None:
        return "—"
    mean, std, n = cell
    spread = "–" if math.isnan(std) else f"{std:.2f}"
    return f"{mean:.2f} ± {spread}" + ("" if n == 5 else f" ({n})")


def _figure(
    path: str,
    blocks: dict[tuple[str, str], dict[str, set]],
    short: dict[tuple[str, str, str, float], Summary],
    long: dict[tuple[str, str, str, float], Summary],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(blocks))
    rows = math.ceil(len(blocks) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    colours = {}
    for ax, ((dataset, model), methods) in zip(axes.flat, blocks.items()):
        levels = sorted(set().union(*methods.values()))
        xs = list(range(len(levels)))
        for method in methods:
            colour = colours.setdefault(method, f"C{len(colours)}")
            for budget, cells, style in (("230 ep", long, "-"), ("15 ep", short, "--")):
                points = [
                    (x, cells[(dataset, model, method, lv)])
                    for x, lv in zip(xs, levels)
                    if (dataset, model, method, lv) in cells
                ]
                if not points:
                    continue
                px = [x for x, _ in points]
                mean = [c[0] for _, c in points]
                std = [0.0 if math.isnan(c[1]) else c[1] for _, c in points]
                ax.plot(px, mean, style, marker="o", markersize=3, color=colour, label=f"{method} {budget}")
                ax.fill_between(
                    px, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=colour, alpha=0.12
                )
        ax.set_xticks(xs, [f"{100 * lv:g}" for lv in levels])
        ax.set_title(f"{dataset}, {model}")
        ax.set_xlabel("weights removed (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(blocks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 2 * columns), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(short_sources: list[str], long_db: str, figure: str | None = None) -> None:
    kept: dict[tuple[str, str, str, float], list[tuple[float, ...]]] = {}  # per cell: kept weights per run
    short_kept: dict[tuple[str, str, str, float], list[tuple[float, ...]]] = {}  # the same, short stores
    sizes: dict[tuple[str, str], tuple[int, ...]] = {}  # per (dataset, model): weights per layer
    long_values, long_strengths = _cells(long_db, kept, sizes)
    long = {key: _summary(values) for key, values in long_values.items()}
    wanted = {(method, model) for _, model, method, _ in long}
    short: dict[tuple[str, str, str, float], Summary] = {}
    short_strengths: dict[tuple[str, str, str], set] = defaultdict(set)
    for source in short_sources:
        if Path(source).is_dir():
            cells = _table_cells(Path(source), wanted)
        else:
            source_kept: dict[tuple[str, str, str, float], list[tuple[float, ...]]] = {}
            values, strengths = _cells(source, source_kept)
            cells = {key: _summary(v) for key, v in values.items()}
            for key, per_run in source_kept.items():
                short_kept.setdefault(key, per_run)
            for key, found in strengths.items():
                short_strengths.setdefault(key, found)
        for key, cell in cells.items():
            short.setdefault(key, cell)
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
            f"{m}: {', '.join(sorted(short_strengths.get((dataset, model, m), {'study A spec'})))} (15 ep), "
            f"{', '.join(sorted(long_strengths.get((dataset, model, m), {'—'})))} (230 ep)"
            for m in methods
            if (dataset, model, m) in long_strengths
        ]
        if notes:
            print("\nStrengths: " + "; ".join(notes) + ".")
        if (dataset, model) not in sizes:  # no record of this block has per-layer sparsity
            continue
        of = " / ".join(f"{n:,}" for n in sizes[(dataset, model)])
        # Both budgets' split where a short store recorded one for this block, else the long one's only.
        both = any((dataset, model, m, lv) in short_kept for m in methods for lv in levels)
        sources = [(short_kept, "15 ep"), (kept, "230 ep")] if both else [(kept, "")]
        print(f"\nWeights kept, fc1 / fc2 (of {of}), mean over seeds{'' if both else ', 230 epochs'}:\n")
        print("| level | " + " | ".join(f"{m} {label}".strip() for m in methods for _, label in sources) + " |")
        print("|---:|" + "---:|" * (len(methods) * len(sources)))
        for level in levels:
            row = []
            for m in methods:
                for found, _ in sources:
                    per_run = found.get((dataset, model, m, level))
                    row.append(" / ".join(f"{statistics.mean(col):.1f}" for col in zip(*per_run)) if per_run else "—")
            print(f"| {100 * level:g} % | " + " | ".join(row) + " |")
    if figure:
        _figure(figure, blocks, short, long)


if __name__ == "__main__":
    args = sys.argv[1:]
    figure_path = None
    if "--figure" in args:
        at = args.index("--figure")
        if at + 1 >= len(args):
            sys.exit("--figure needs a path (a .png file)")
        figure_path = args[at + 1]
        del args[at : at + 2]
    if len(args) < 2:
        sys.exit(__doc__)
    main(args[:-1], args[-1], figure_path)
