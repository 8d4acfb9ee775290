"""Measured latency of sparse (CSR) Linear layers against dense ones (docs/sparse.md).

Three tables, each measured in interleaved rounds (``prunelab.sparse.compare_latency``: the order
of the candidates reversed every other round, the median over rounds of each round's median), so
drift of the machine affects all candidates alike:

* ``layers``: a 784→300 and a 300→100 Linear layer (those of LeNet-300-100) with random weights,
  a random fraction of them zeroed, as ``nn.Linear`` and as ``SparseLinear``, at batch 1 and 64;
* ``lenet``: LeNet-300-100 (``build_model("mlp", hidden=[300, 100])``) with every layer pruned to
  the same sparsity by magnitude, as is and with every Linear as ``SparseLinear``;
* ``formulations`` (with ``--formulations``): the torch kernels ``SparseLinear`` chose from, on
  the 784→300 layer at 95 % sparsity (the reason for its choice of kernel).

    python benchmarks/sparse.py [--threads 1 2] [--rounds 5] [--repeats 50] [--formulations] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

import prunelab
from prunelab.sparse import SparseLinear, compare_latency, sparsify

SHAPES = ((784, 300), (300, 100))
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
LENET_SPARSITIES = (0.8, 0.9, 0.95, 0.98)
BATCH_SIZES = (1, 64)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


def random_linear(n_in: int, n_out: int, sparsity: float, seed: int = 0) -> nn.Linear:
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=generator))
        layer.weight.mul_(torch.rand(n_out, n_in, generator=generator) >= sparsity)
    return layer


def lenet(sparsity: float) -> nn.Module:
    model = prunelab.build_model("mlp", input_shape=(1, 28, 28), n_classes=10, hidden=[300, 100], seed=0)
    with torch.no_grad():
        for layer in (model.fc1, model.fc2, model.fc3):
            k = round(sparsity * layer.weight.numel())
            threshold = layer.weight.abs().flatten().kthvalue(k).values
            layer.weight.mul_(layer.weight.abs() > threshold)
    return model


def print_table(headers: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join(":---" if i == 0 else "---:" for i in range(len(headers))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
        for row in [headers, *rows]:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print()


def layers_table(args, threads: int) -> None:
    rows = []
    for n_in, n_out in SHAPES:
        for sparsity in SPARSITIES:
            dense = random_linear(n_in, n_out, sparsity)
            ms = compare_latency(
                {"dense": dense, "sparse": SparseLinear.from_linear(dense)},
                (n_in,),
                BATCH_SIZES,
                threads=threads,
                rounds=args.rounds,
                repeats=args.repeats,
                warmup=args.warmup,
            )
            rows.append(
                [f"{n_in}→{n_out}", f"{100 * sparsity:g} %"]
                + [f"{1e3 * ms[k][b]:.1f}" for b in BATCH_SIZES for k in ("dense", "sparse")]
                + [f"{ms['dense'][b] / ms['sparse'][b]:.2f}×" for b in BATCH_SIZES]
            )
    print(f"Linear layer alone, median µs per call, {threads} thread(s)")
    print_table(
        ["layer", "sparsity", "dense b1", "sparse b1", "dense b64", "sparse b64", "speedup b1", "speedup b64"],
        rows,
        args.markdown,
    )


def lenet_table(args, threads: int) -> None:
    rows = []
    for sparsity in LENET_SPARSITIES:
        model = lenet(sparsity)
        sparse, _ = sparsify(model, (1, 28, 28), min_sparsity=0.0, only_if_faster=False)
        timed, report = sparsify(
            model,
            (1, 28, 28),
            min_sparsity=0.0,
            batch_size=1,
            threads=threads,
            rounds=args.rounds,
            repeats=args.repeats,
            warmup=args.warmup,
        )
        ms = compare_latency(
            {"dense": model, "sparse": sparse, "timed": timed},
            (1, 28, 28),
            BATCH_SIZES,
            threads=threads,
            rounds=args.rounds,
            repeats=args.repeats,
            warmup=args.warmup,
        )
        rows.append(
            [f"{100 * sparsity:g} %"]
            + [f"{1e3 * ms[k][b]:.1f}" for b in BATCH_SIZES for k in ("dense", "sparse")]
            + [f"{ms['dense'][b] / ms['sparse'][b]:.2f}×" for b in BATCH_SIZES]
            + [", ".join(report.replaced) or "-", f"{ms['dense'][1] / ms['timed'][1]:.2f}×"]
        )
    print(f"LeNet-300-100, every layer pruned to the sparsity, median µs per call, {threads} thread(s)")
    print_table(
        [
            "sparsity",
            "dense b1",
            "sparse b1",
            "dense b64",
            "sparse b64",
            "speedup b1",
            "speedup b64",
            "sparsify(b1) replaces",
            "its speedup b1",
        ],
        rows,
        args.markdown,
    )


def formulations_table(args, threads: int) -> None:
    """The candidate kernels, timed directly (no module around them) on the 784→300 layer at 95 %."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = _time_formulations(args)
    finally:
        torch.set_num_threads(previous)
    print(f"Kernels for a 784→300 layer at 95 % sparsity, median µs per call, {threads} thread(s)")
    print_table(["formulation", "batch 1", "batch 64"], rows, args.markdown)


def _time_formulations(args) -> list[list[str]]:
    layer = random_linear(784, 300, 0.95)
    weight, bias = layer.weight.detach(), layer.bias.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr64 = weight.to_sparse_csr()
        crow, col, values = csr64.crow_indices().int(), csr64.col_indices().int(), csr64.values()
        csr32 = torch.sparse_csr_tensor(crow, col, values, weight.shape)
        coo = weight.to_sparse().coalesce()
        csc = weight.to_sparse_csc()
        transposed_csr = weight.t().contiguous().to_sparse_csr()
    column = bias[:, None]
    candidates = {
        "dense F.linear (zeros kept)": lambda x: F.linear(x, weight, bias),
        "CSR int64, addmm(b, W, xᵀ)ᵀ": lambda x: torch.addmm(column, csr64, x.t()).t(),
        "CSR int32, addmm(b, W, xᵀ)ᵀ": lambda x: torch.addmm(column, csr32, x.t()).t(),
        "CSR int32, addmv(b, W, x) (one row)": lambda x: torch.addmv(bias, csr32, x[0]),
        "embedding_bag over the CSR arrays": lambda x: (
            F.embedding_bag(
                col, x.t().contiguous(), crow, mode="sum", per_sample_weights=values, include_last_offset=True
            ).t()
            + bias
        ),
        "COO, addmm(b, W, xᵀ)ᵀ": lambda x: torch.addmm(column, coo, x.t()).t(),
        "CSC, addmm(b, W, xᵀ)ᵀ": lambda x: torch.addmm(column, csc, x.t()).t(),
        "x @ Wᵀ with Wᵀ in CSR": lambda x: x @ transposed_csr + bias,
    }
    rows = []
    for name, function in candidates.items():
        cells = [name]
        for batch in BATCH_SIZES:
            if "one row" in name and batch != 1:
                cells.append("-")
                continue
            x = torch.randn(batch, 784)
            times = []
            with torch.inference_mode():
                for _ in range(args.warmup):
                    function(x)
                for _ in range(args.rounds * args.repeats):
                    start = time.perf_counter()
                    function(x)
                    times.append(time.perf_counter() - start)
            cells.append(f"{1e6 * statistics.median(times):.1f}")
        rows.append(cells)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over them)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--formulations", action="store_true", help="also time the candidate kernels")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}; {load()}; {args.rounds} rounds × {args.repeats} calls\n")
    for threads in args.threads:
        if args.formulations:
            formulations_table(args, threads)
        layers_table(args, threads)
        lenet_table(args, threads)
    print(f"finished; {load()}")


if __name__ == "__main__":
    main()
