"""Study D's storage under two accountings: prunelab's exact one and Zhu & Gupta's (2017, §5).

    python docs/results/study-d/storage_accounting.py > docs/results/study-d/storage.md

Reads only committed files of this folder, no store and no weights:

- the non-zeros of each pruned level (weights and biases; the same for every scope, dataset and
  seed) from ``summary.md`` (784-400-10 MLP) and ``summary-conv.md`` (LeNet-5);
- the bytes as dense, bit-mask and exact CSR with 4-bit relative indices from
  ``tables/bytes-*.csv`` and ``tables-conv/bytes-*.csv`` (mean over the three scopes and the two
  datasets; every cell has the same number of seeds, so this is the mean over runs). The conv
  study tabled no dense bytes; they are ``4·N`` (``summary-conv.md``: 1,724,320).

Zhu & Gupta's count, ``csr_no_fill = nnz·(b + r)`` bits (``prunelab.metrics.csr_no_fill_bits``),
depends on the non-zeros only, so it is computed here for ``r = 4`` and ``5`` with ``b = 32``
(study D stores float32; it has no quantised values). It is taken over the whole model,
``⌈nnz·(b + r) / 8⌉`` bytes; rounding each tensor to whole bytes, as prunelab's summary does,
would add less than one byte per tensor (4 tensors in the MLP, 8 in LeNet-5). The script checks
the non-zeros against the bit-mask bytes (``Σ_t ⌈N_t / 8⌉ + 4·nnz`` for float32) and the dense
bytes (``4·N``).

Exact CSR needs the positions of the non-zeros (the fillers count gaps longer than ``2^r − 1``),
which the committed data do not have: it is here at 4 bits, as the runs recorded it. For 5-bit
and automatic widths the script gives, as a labelled model and not as study D's numbers, the
expected exact size when the non-zeros sit at independent random positions (gaps geometric:
``n_fill/nnz = q / (1 − q)``, ``q = (1 − d)^(2^r)``, ``d = nnz / N``), per element
``d·(b + r) / (1 − q)`` bits, with ``"auto"`` the smallest over ``r = 1 … 16``.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path

from prunelab.metrics.storage import INDEX_BITS, csr_no_fill_bits

HERE = Path(__file__).resolve().parent
BITS = 32  # float32 values; study D does not quantise
LEVELS = (0.5, 0.75, 0.9, 0.95, 0.98)
DATASETS = ("mnist", "fashion-mnist")

# Parameter tensors (entries) of the pruned models, weights then biases, layer by layer.
MODELS = {
    "MLP 784-400-10": {
        "summary": "summary.md",
        "tables": "tables",
        "tensors": (784 * 400, 400, 400 * 10, 10),
    },
    "LeNet-5": {
        "summary": "summary-conv.md",
        "tables": "tables-conv",
        "tensors": (20 * 1 * 5 * 5, 20, 50 * 20 * 5 * 5, 50, 800 * 500, 500, 500 * 10, 10),
    },
}
# Which tensors are biases (never pruned, all non-zero in these runs).
BIASES = {"MLP 784-400-10": (400, 10), "LeNet-5": (20, 50, 500, 10)}


def nonzeros(summary: Path) -> dict[float, int]:
    """Non-zeros per pruned level from a summary's accuracy table (rows ``| scope | 50 % | 159,210 |``)."""
    found: dict[float, set[int]] = {}
    for line in summary.read_text().splitlines():
        match = re.match(r"\| (local|global|layerwise-constant) \| ([\d.]+) % \| ([\d,]+) \|", line)
        if match:
            found.setdefault(float(match[2]) / 100, set()).add(int(match[3].replace(",", "")))
    assert all(len(values) == 1 for values in found.values()), f"{summary}: non-zeros differ between scopes"
    return {level: values.pop() for level, values in found.items()}


def mean_bytes(folder: Path, fmt: str) -> dict[float, float] | None:
    """Mean bytes per level over scopes and datasets, from ``bytes-<fmt>-sparsity-by-method-*.csv``
    (``None`` if the study did not table that format)."""
    cells: dict[float, list[float]] = {}
    for dataset in DATASETS:
        path = folder / f"bytes-{fmt}-sparsity-by-method-{dataset}.csv"
        if not path.exists():
            return None
        with open(path) as handle:
            for row in csv.DictReader(handle):
                means = [float(v) for k, v in row.items() if k.endswith(" mean")]
                cells.setdefault(float(row["sparsity"]), []).extend(means)
    return {level: statistics.mean(values) for level, values in cells.items()}


def no_fill_bytes(nnz: int, index_bits: int) -> int:
    return -(-csr_no_fill_bits(nnz, BITS, index_bits) // 8)


def expected_exact(density: float, bits: int, index_bits: int) -> float:
    """Expected exact CSR bits per element, non-zeros at independent random positions."""
    if density <= 0:
        return 0.0
    q = (1 - density) ** (2**index_bits)
    return density * (bits + index_bits) / (1 - q)


def expected_auto(density: float, bits: int) -> float:
    return min(expected_exact(density, bits, r) for r in INDEX_BITS)


def ranges(wins, steps: int = 10_000) -> list[tuple[float, float]]:
    """The sparsity intervals (grid of ``1 / steps``, ends included) where ``wins(sparsity)``."""
    out, start = [], None
    for i in range(1, steps):
        sparsity = i / steps
        if wins(sparsity) and start is None:
            start = sparsity
        elif not wins(sparsity) and start is not None:
            out.append((start, (i - 1) / steps))
            start = None
    if start is not None:
        out.append((start, (steps - 1) / steps))
    return out


def pct(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f} %"


def show_ranges(found: list[tuple[float, float]], steps: int = 10_000) -> str:
    if not found:
        return "never"
    return ", ".join(f"above {pct(a)}" if b == (steps - 1) / steps else f"{pct(a)} to {pct(b)}" for a, b in found)


def main() -> None:
    print("# Study D: storage, prunelab's exact count and Zhu & Gupta's\n")
    print("Made by `storage_accounting.py` from the committed `summary*.md` and `tables*/bytes-*.csv`;")
    print(f"b = {BITS} (float32). Bytes of weights and biases, mean over scopes, datasets and seeds.")
    print("*exact CSR*: prunelab's count with filler entries, `(nnz + n_fill)·(b + r)`, as the runs")
    print("recorded it (r = 4). *no-fill*: Zhu & Gupta's count, `nnz·(b + r)`, from the non-zeros.\n")
    crossings = {}
    for name, spec in MODELS.items():
        tensors = spec["tensors"]
        n_total = sum(tensors)
        mask_overhead = sum(-(-n // 8) for n in tensors)
        nnz = nonzeros(HERE / spec["summary"])
        dense, mask, csr4 = (mean_bytes(HERE / spec["tables"], fmt) for fmt in ("dense", "bitmask", "csr"))
        assert mask is not None and csr4 is not None, name
        dense = dense or dict.fromkeys(LEVELS, 4.0 * n_total)  # the conv study did not table dense bytes: 4·N
        assert sorted(nnz) == sorted(mask) == sorted(csr4) == sorted(dense) == list(LEVELS), name
        print(f"## {name} ({n_total:,} parameters)\n")
        print(
            "| sparsity | non-zeros | density | dense | bit-mask | exact CSR (4-bit) | no-fill (4-bit) "
            "| no-fill (5-bit) | exact − no-fill (4-bit) | ≈ fillers per non-zero (4-bit) |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for level in LEVELS:
            k = nnz[level]
            assert dense[level] == 4 * n_total, (name, level)
            assert mask[level] == mask_overhead + 4 * k, (name, level, mask[level], mask_overhead + 4 * k)
            nf4, nf5 = no_fill_bytes(k, 4), no_fill_bytes(k, 5)
            fillers = (csr4[level] - nf4) / 4.5  # bytes per entry at b + r = 36 bits
            print(
                f"| {100 * level:g} % | {k:,} | {k / n_total:.4f} | {dense[level]:,.0f} | {mask[level]:,.0f} | "
                f"{csr4[level]:,.0f} | {nf4:,} | {nf5:,} | {csr4[level] - nf4:,.0f} | {fillers / k:.3f} |"
            )
        print()
        weights = n_total - sum(BIASES[name])
        biases = sum(BIASES[name])
        rows = []
        for r in (4, 5):
            # no-fill < bit-mask  ⇔  nnz·r < N (bits, whole model); nnz = (1 − s)·weights + biases
            mask_at = 1 - (n_total / r - biases) / weights
            dense_at = 1 - (n_total * BITS / (BITS + r) - biases) / weights
            rows.append((r, dense_at, mask_at))
        crossings[name] = rows
        print("Where the no-fill count crosses, in the weights' sparsity (biases stay dense):\n")
        print("| index bits | no-fill < dense above | no-fill < bit-mask above |")
        print("|---:|---:|---:|")
        for r, dense_at, mask_at in rows:
            print(f"| {r} | {pct(dense_at)} | {pct(mask_at)} |")
        wins4 = [f"{100 * s:g} %" for s in LEVELS if no_fill_bytes(nnz[s], 4) < mask[s]]
        wins5 = [f"{100 * s:g} %" for s in LEVELS if no_fill_bytes(nnz[s], 5) < mask[s]]
        exact_mask = [f"{100 * s:g} %" for s in LEVELS if csr4[s] < mask[s]]
        exact_dense = [f"{100 * s:g} %" for s in LEVELS if csr4[s] < dense[s]]
        print()
        print(f"- Exact CSR (4-bit) smaller than dense at: {', '.join(exact_dense) or 'none'} of the five levels;")
        print(f"  smaller than the bit-mask at: {', '.join(exact_mask) or 'none'}.")
        print(f"- No-fill (4-bit) smaller than the bit-mask at: {', '.join(wins4) or 'none'};")
        print(f"  no-fill (5-bit) at: {', '.join(wins5) or 'none'}.\n")

    print("## The crossovers per element (any tensor; d = density = 1 − sparsity)\n")
    print("No-fill count, exact: `d·(b + r) < b` (beats dense) above sparsity `r / (b + r)`;")
    print("`d·(b + r) < 1 + d·b` (beats the bit-mask) above `1 − 1/r`, whatever b.\n")
    print("| b | r | no-fill < dense above | no-fill < bit-mask above |")
    print("|---:|---:|---:|---:|")
    for b in (32, 16, 8):
        for r in (4, 5):
            print(f"| {b} | {r} | {pct(r / (b + r))} | {pct(1 - 1 / r)} |")
    print()
    print("Exact count, expected size with the non-zeros at independent random positions (a model,")
    print("not study D's weights): sparsities (grid of 0.01 %) at which CSR is the smallest of")
    print("dense, bit-mask and CSR.\n")
    print("| b | r = 4 | r = 5 | auto (best r in 1…16) |")
    print("|---:|---|---|---|")
    for b in (32, 16, 8):
        cells = []
        for size in (
            lambda d, b=b: expected_exact(d, b, 4),
            lambda d, b=b: expected_exact(d, b, 5),
            lambda d, b=b: expected_auto(d, b),
        ):
            cells.append(show_ranges(ranges(lambda s, size=size, b=b: size(1 - s) < min(b, 1 + (1 - s) * b))))
        print(f"| {b} | " + " | ".join(cells) + " |")
    print()
    margin = min((expected_exact(1 - i / 1000, 32, 4) - (1 + (1 - i / 1000) * 32), i / 1000) for i in range(1, 1000))
    print(
        f"With b = 32 and r = 4 the random-position model's exact CSR stays above the bit-mask at every "
        f"sparsity; closest at {pct(margin[1], 1)}, {margin[0]:.4f} bits per element above it."
    )
    assert all(math.isfinite(v) for rows in crossings.values() for _, *vals in rows for v in vals)


if __name__ == "__main__":
    main()
