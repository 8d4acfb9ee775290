"""Study F's summary tables from its store: one-shot perplexity per criterion and pattern, recovery,
structured pruning with and without refit, latency, large-sparse vs small-dense, and wall time.

    python docs/results/lm/summarize.py runs/study-f.db > docs/results/lm/summary.md

Runs of the spec that are not done yet are shown as "pending", so the script also summarises a
study in progress (the header counts done, pending and failed runs).
"""

from __future__ import annotations

import sys
from collections import Counter

from prunelab.store import Store

CRITERIA = ("magnitude", "wanda", "obs-fast", "obs-exact")
PATTERNS = (("50 %", "", 0.5), ("70 %", "", 0.7), ("2:4", " 2:4", 0.5), ("4:8", " 4:8", 0.5))
PENDING = "pending"


class Runs:
    """The study's records by (model, method, level)."""

    def __init__(self, records):
        self.records = records
        self.by = {(r.model, r.method, round(r.sparsity, 6)): r for r in records}

    def get(self, model: str, method: str, level: float):
        return self.by.get((model, method, round(level, 6)))

    def value(self, model: str, method: str, level: float, metric: str, fmt: str = "{:.1f}") -> str:
        record = self.get(model, method, level)
        if record is None:
            return "–"  # not in the spec
        if record.status != "done":
            return "failed" if record.status == "failed" else PENDING
        value = record.metrics.get(metric)
        return "–" if value is None else fmt.format(value)

    def dense(self, model: str, metric: str = "perplexity_dense") -> float | None:
        values = [
            r.metrics[metric]
            for r in self.records
            if r.model == model and r.status == "done" and r.metrics.get(metric) is not None
        ]
        return values[0] if values else None


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def one_shot(runs: Runs, model: str) -> str:
    rows = []
    for criterion in CRITERIA:
        rows.append(
            [criterion] + [runs.value(model, criterion + suffix, level, "perplexity") for _, suffix, level in PATTERNS]
        )
    return table(["criterion", *(name for name, _, _ in PATTERNS)], rows)


def recovery(runs: Runs, model: str) -> str:
    control = runs.value(model, "dense+ft", 0.0, "perplexity")
    dense = runs.dense(model)
    dense = "–" if dense is None else f"{dense:.1f}"
    rows = [["dense, none", dense, dense], ["dense, fine-tuned 40 steps (the control)", control, control]]
    for criterion in CRITERIA[:3]:
        for tag, name in (("", "none"), ("+ft", "fine-tuned 40 steps"), ("+kd", "distilled 40 steps")):
            rows.append(
                [
                    f"{criterion}, {name}",
                    runs.value(model, criterion + tag, 0.7, "perplexity"),
                    runs.value(model, f"{criterion} 2:4{tag}", 0.5, "perplexity"),
                ]
            )
    return table(["method, recovery", "70 %", "2:4"], rows)


STRUCTURED = (
    ("heads+mlp", 0.25),
    ("heads+mlp+refit", 0.25),
    ("heads+mlp", 0.5),
    ("heads+mlp+refit", 0.5),
    ("heads+mlp+refit+kd", 0.5),
    ("blocks[blocks=1]", 0.0),
    ("blocks+refit[blocks=1]", 0.0),
    ("blocks+refit+kd", 0.0),
    ("blocks[blocks=2]", 0.0),
    ("blocks+refit[blocks=2]", 0.0),
)


def structured(runs: Runs, model: str) -> str:
    rows = []
    for method, level in STRUCTURED:
        what = f"{method} {level:.0%}" if level else method
        rows.append(
            [
                what,
                runs.value(model, method, level, "perplexity_pruned"),
                runs.value(model, method, level, "perplexity"),
                runs.value(model, method, level, "params", "{:,.0f}"),
                runs.value(model, method, level, "speedup", "{:.2f}×"),
                runs.value(model, method, level, "latency_ms_b1", "{:.2f}"),
                runs.value(model, method, level, "measured_speedup_b1", "{:.2f}×"),
                runs.value(model, method, level, "latency_ms_b16", "{:.2f}"),
                runs.value(model, method, level, "measured_speedup_b16", "{:.2f}×"),
            ]
        )
    return table(
        [
            "method",
            "ppl after cut",
            "ppl final",
            "params",
            "FLOPs speedup",
            "ms @1",
            "measured @1",
            "ms @16",
            "measured @16",
        ],
        rows,
    )


def latency(runs: Runs, model: str) -> str:
    rows = []
    for criterion in CRITERIA[:3]:
        for level in (0.5, 0.7):
            rows.append(
                [
                    f"{criterion} {level:.0%}",
                    runs.value(model, criterion, level, "nonzero_params", "{:,.0f}"),
                    runs.value(model, criterion, level, "speedup", "{:.2f}×"),
                    runs.value(model, criterion, level, "latency_ms_b1", "{:.2f}"),
                    runs.value(model, criterion, level, "latency_sparse_ms_b1", "{:.2f}"),
                    runs.value(model, criterion, level, "latency_ms_b16", "{:.2f}"),
                    runs.value(model, criterion, level, "latency_sparse_ms_b16", "{:.2f}"),
                ]
            )
    return table(
        [
            "method",
            "non-zeros",
            "FLOPs speedup",
            "ms @1 dense kernels",
            "ms @1 CSR",
            "ms @16 dense kernels",
            "ms @16 CSR",
        ],
        rows,
    )


def large_sparse(runs: Runs) -> str:
    rows = []
    for level, width in ((0.5, 147), (0.75, 118), (0.9, 99)):
        small = f"lstm-small[d_model={width}]"
        rows.append(
            [
                f"{level:.0%}",
                runs.value("lstm", "AGP", level, "nonzero_params", "{:,.0f}"),
                runs.value("lstm", "AGP", level, "perplexity"),
                f"{width}",
                runs.value(small, "small-dense", 0.0, "nonzero_params", "{:,.0f}"),
                runs.value(small, "small-dense", 0.0, "perplexity"),
            ]
        )
    return table(
        ["sparsity", "lstm (200) AGP: non-zeros", "test ppl", "small dense width", "non-zeros", "test ppl"], rows
    )


def dense_models(runs: Runs) -> str:
    rows = []
    for model in sorted({r.model for r in runs.records}):
        done = [r for r in runs.records if r.model == model and r.status == "done"]
        if not done:
            rows.append([model, PENDING, "", "", "", ""])
            continue
        m = done[0].metrics
        params = m.get("params_dense", m.get("params"))
        rows.append(
            [
                model,
                f"{params:,}",
                f"{m.get('perplexity_dense', float('nan')):.1f}",
                f"{m.get('val_perplexity_dense', float('nan')):.1f}",
                str(m.get("dense_best_epoch", "–")),
                str(m.get("dense_epochs", "–")),
            ]
        )
    return table(["model", "parameters", "test ppl", "valid ppl", "best epoch", "epochs trained"], rows)


def wall_time(runs: Runs) -> str:
    done = [r for r in runs.records if r.status == "done" and r.started_at and r.finished_at]
    if not done:
        return "no run finished yet"
    intervals = sorted((r.started_at, r.finished_at) for r in done)
    busy, end = 0.0, None
    for start, finish in intervals:
        if end is None or start > end:
            busy += finish - start
            end = finish
        elif finish > end:
            busy += finish - end
            end = finish
    per_model = Counter()
    for r in done:
        per_model[r.model] += r.seconds or 0.0
    parts = ", ".join(f"{model} {seconds / 60:.1f} min" for model, seconds in sorted(per_model.items()))
    return f"busy wall time {busy / 3600:.2f} h over {len(done)} runs ({parts})"


def main(path: str) -> None:
    with Store(path, readonly=True) as store:
        records = store.records()
    runs = Runs(records)
    counts = Counter(r.status for r in records)
    print("# Study F: summary tables\n")
    print(
        f"Generated by `python docs/results/lm/summarize.py {path}`: {len(records)} runs in the spec, "
        f"{counts.get('done', 0)} done, {counts.get('pending', 0) + counts.get('running', 0)} pending, "
        f"{counts.get('failed', 0)} failed. Perplexity is the test perplexity (500 sequences of 64 tokens); "
        f"'pending' marks runs not finished when this was generated.\n"
    )
    print("## Dense models\n\n" + dense_models(runs) + "\n")
    for model in ("gpt", "lstm"):
        print(f"## {model}: one-shot, no recovery (test perplexity; dense {runs.dense(model) or float('nan'):.1f})\n")
        print(one_shot(runs, model) + "\n")
        print(f"## {model}: recovery (test perplexity)\n\n" + recovery(runs, model) + "\n")
        print(f"## {model}: size and latency of the one-shot models (batch 1 / 16, one thread)\n")
        print(latency(runs, model) + "\n")
    print("## gpt: structured pruning (heads and MLP channels, blocks), with and without the refit\n")
    print(structured(runs, "gpt") + "\n")
    print("## lstm: large-sparse (AGP) vs small-dense at equal non-zeros\n\n" + large_sparse(runs) + "\n")
    print("## Wall time\n\n" + wall_time(runs))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/study-f.db")
