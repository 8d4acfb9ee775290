"""Measured speed-up of physically thinned models against their masked twins (docs/methods.md §6).

For LeNet-300-100 (784-300-100-10) and ``medium_conv`` on MNIST-shaped inputs
(1×28×28), ``units.remove_units(model, "norm", fraction=f, layers="all")`` removes
25 %, 50 % and 75 % of the units of every unit layer. Compared in the same run:

* ``masked``  – the model after ``remove_units``: same shapes, the removed units
                output 0 (the baseline; it costs what the dense model costs);
* ``thinned`` – ``units.thin(model, result)``: the physically smaller copy.

The theoretical speed-up is ``summary(dense).total.flops_dense /
summary(thinned).total.flops``; the measured one is ``median latency(masked) /
median latency(thinned)`` at batch 1 and batch 64, from ``prunelab.measure_latency``.
Masked and thinned are measured in interleaved rounds (their order alternating
each round), each round a ``measure_latency`` call of ``--repeats`` timed calls,
and the table gives the median over rounds, so drift of the machine affects both.
Target: measured ≥ 70 % of theoretical at batch 64. The last column, the arithmetic rate
each model achieves at batch 64, shows where a shortfall comes from: smaller layers run
further from the machine's peak.

    python benchmarks/thinning.py [--threads 1 2] [--repeats 30] [--rounds 7] [--models mlp medium_conv]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import prunelab
from prunelab import units

INPUT_SHAPE = (1, 28, 28)
FRACTIONS = (0.25, 0.5, 0.75)
BATCH_SIZES = (1, 64)
TARGET = 0.70
MODELS = {  # name in the table → build_model arguments
    "mlp": ("mlp", {"hidden": [300, 100]}),
    "medium_conv": ("medium_conv", {}),
}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


def pair(name: str, fraction: float):
    """The dense model's FLOPs, and the masked and thinned models at ``fraction`` removed."""
    family, options = MODELS[name]
    dense = prunelab.build_model(family, input_shape=INPUT_SHAPE, seed=0, **options)
    dense_summary = prunelab.summary(dense, INPUT_SHAPE)
    masked = copy.deepcopy(dense)
    result = units.remove_units(masked, "norm", fraction=fraction, layers="all", input_shape=INPUT_SHAPE)
    thinned = units.thin(masked, result)
    check_equal_outputs(name, masked, thinned)
    return dense_summary, masked, thinned


def check_equal_outputs(name: str, masked, thinned) -> None:
    x = torch.randn(8, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        gap = (masked.eval()(x) - thinned.eval()(x)).abs().max().item()
    if gap > 1e-4:
        raise RuntimeError(f"{name}: thinned outputs differ from the masked model's by {gap:.2e}")


def measure(models: dict, args, threads: int) -> dict[str, dict[int, float]]:
    """Median over interleaved rounds of each model's median latency (ms), per batch size."""
    per_round = {name: {b: [] for b in BATCH_SIZES} for name in models}
    names = list(models)
    for index in range(args.rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            for row in prunelab.measure_latency(
                models[name], INPUT_SHAPE, BATCH_SIZES, warmup=args.warmup, repeats=args.repeats, threads=threads
            ):
                per_round[name][row.batch_size].append(row.median_ms)
    return {name: {b: statistics.median(v) for b, v in rows.items()} for name, rows in per_round.items()}


def row(name: str, fraction: float, args, threads: int) -> dict:
    dense_summary, masked, thinned = pair(name, fraction)
    thinned_summary = prunelab.summary(thinned, INPUT_SHAPE)
    theoretical = dense_summary.total.flops_dense / thinned_summary.total.flops
    ms = measure({"masked": masked, "thinned": thinned}, args, threads)
    measured = {b: ms["masked"][b] / ms["thinned"][b] for b in BATCH_SIZES}
    return {
        "model": name,
        "fraction": fraction,
        "params_dense": dense_summary.total.params,
        "params_thinned": thinned_summary.total.params,
        "theoretical": theoretical,
        "masked_ms": ms["masked"],
        "thinned_ms": ms["thinned"],
        "measured": measured,
        "of_theoretical": measured[64] / theoretical,
        # achieved arithmetic rate at batch 64: FLOPs of one input × 64 / latency
        "gflops": {
            k: flops * 64 / (ms[k][64] * 1e-3) / 1e9
            for k, flops in (("masked", dense_summary.total.flops_dense), ("thinned", thinned_summary.total.flops))
        },
    }


HEADERS = (
    "model",
    "removed",
    "params dense → thinned",
    "theoretical",
    "masked ms b1 / b64",
    "thinned ms b1 / b64",
    "measured b1",
    "measured b64",
    "b64 / theoretical",
    "GFLOP/s b64 masked / thinned",
)


def cells(r: dict) -> list[str]:
    verdict = "ok" if r["of_theoretical"] >= TARGET else "below"
    return [
        r["model"],
        f"{100 * r['fraction']:.0f} %",
        f"{r['params_dense']:,} → {r['params_thinned']:,}",
        f"{r['theoretical']:.2f}×",
        f"{r['masked_ms'][1]:.3f} / {r['masked_ms'][64]:.3f}",
        f"{r['thinned_ms'][1]:.3f} / {r['thinned_ms'][64]:.3f}",
        f"{r['measured'][1]:.2f}×",
        f"{r['measured'][64]:.2f}×",
        f"{100 * r['of_theoretical']:.0f} % ({verdict})",
        f"{r['gflops']['masked']:.1f} / {r['gflops']['thinned']:.1f}",
    ]


def print_table(rows: list[dict], markdown: bool) -> None:
    table = [cells(r) for r in rows]
    if markdown:
        print("| " + " | ".join(HEADERS) + " |")
        print("|" + "|".join([":---", "---:"] + ["---:"] * (len(HEADERS) - 2)) + "|")
        for line in table:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(c[i]) for c in [HEADERS, *table]) for i in range(len(HEADERS))]
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(HEADERS, widths))))
    for line in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts, one table each (default: torch's current setting)",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per model, batch size and round")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median over them)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per measure_latency call")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = parser.parse_args()
    for option in ("repeats", "rounds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    threads_list = args.threads or [torch.get_num_threads()]

    print(f"prunelab {prunelab.__version__}, torch {torch.__version__}; {load()} at start")
    print(
        f"inputs {INPUT_SHAPE}; units removed by 'norm' from every unit layer; median of "
        f"{args.rounds} interleaved rounds × {args.repeats} calls (warm-up {args.warmup}); "
        f"speed-up = masked / thinned latency; target: batch-64 speed-up ≥ {100 * TARGET:.0f} % of theoretical"
    )
    for threads in threads_list:
        start = time.perf_counter()
        rows = [row(name, fraction, args, threads) for name in args.models for fraction in FRACTIONS]
        print(f"\n{threads} torch thread(s), {time.perf_counter() - start:.0f} s; {load()} at end")
        print_table(rows, args.markdown)


if __name__ == "__main__":
    main()
