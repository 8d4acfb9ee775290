"""File size and inference latency of exported LeNet-300-100 models (docs/export.md).

LeNet-300-100 (784-300-100-10, ``build_model("mlp", hidden=[300, 100])``) is trained for
``--epochs`` on MNIST (from ``PRUNELAB_DATA``; random initial weights when MNIST is not
there), then for each sparsity a copy is pruned one-shot by weight magnitude with
``--scope`` (global by default) and measured, all in the same run:

* **bytes**: ``torch.save`` of the dense state dict (the baseline), and ``prunelab.save``
  with every tensor forced to dense, bit-mask and CSR (4-bit indices), and chosen per
  tensor (``encoding="auto"``, ``index_bits="auto"``), in float32 and with int8 weights;
  the ratio of the chosen file to the baseline;
* **accuracy** on the MNIST test set of the pruned model and of the int8 file read back;
* **latency** (``prunelab.sparse.inference_latency``: interleaved rounds, medians) at
  batch 1 and 64 of the model as is (dense tensors with zeros), with its sparse Linear
  layers as CSR, and thinned (units whose weights are all zero removed).

Targets (the issue): at 95 % the float32 file is at most 12 % of the baseline and the
int8 file at most 4 %; sparse Linear faster than dense at batch 1 from 95 %.

    python benchmarks/export.py [--sparsities 0.9 0.95 0.98 0.99] [--scope global] [--epochs 1]
                                [--threads 1] [--rounds 7] [--min-sparsity 0.9]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import tempfile
import time
from pathlib import Path

import torch

import prunelab
from prunelab import export
from prunelab.sparse import inference_latency

INPUT_SHAPE = (1, 28, 28)


def trained_model(epochs: int):
    model = prunelab.build_model("mlp", input_shape=INPUT_SHAPE, n_classes=10, hidden=[300, 100], seed=0)
    try:
        ds = prunelab.load_dataset("mnist")
    except (FileNotFoundError, ValueError) as err:
        print(f"MNIST not available ({err}); random initial weights, no accuracy")
        return model, None
    if epochs:
        prunelab.fit(model, ds, epochs=epochs, lr=0.05, seed=0)
    return model, ds


def file_bytes(model, directory: Path, **options) -> int:
    return export.save(model, directory / "m.plm", **options).file_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    parser.add_argument("--scope", default="global", choices=["global", "local"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-sparsity", type=float, default=0.9, help="Linear layers at least this sparse as CSR")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    started = time.perf_counter()
    dense, ds = trained_model(args.epochs)
    one, five, _ = os.getloadavg()
    print(
        f"LeNet-300-100, {args.epochs} epoch(s) of MNIST, one-shot {args.scope} magnitude pruning; "
        f"torch {torch.__version__}, {args.threads} thread(s), load average {one:.2f}/{five:.2f} "
        f"on {os.cpu_count()} cores\n"
    )
    sizes, speed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for sparsity in args.sparsities:
            model = copy.deepcopy(dense)
            prunelab.prune(model, sparsity, scope=args.scope)
            baseline = io.BytesIO()
            torch.save(model.state_dict(), baseline)
            base = len(baseline.getvalue())
            row = {"sparsity": sparsity, "torch.save": base}
            for encoding in ("dense", "bitmask", "csr"):
                row[encoding] = file_bytes(model, tmp, encoding=encoding, index_bits=4)
            row["chosen"] = file_bytes(model, tmp)
            row["int8"] = file_bytes(model, tmp, values="int8")
            if ds is not None:
                row["acc"] = prunelab.evaluate(model, ds)["accuracy"]
                row["acc_int8"] = prunelab.evaluate(export.load(tmp / "m.plm"), ds)["accuracy"]
            sizes.append(row)
            latency = inference_latency(
                model,
                INPUT_SHAPE,
                min_sparsity=args.min_sparsity,
                threads=args.threads,
                rounds=args.rounds,
                repeats=args.repeats,
            )
            speed.append((sparsity, latency))

    print(
        "| sparsity | torch.save | dense | bit-mask | CSR (r=4) | chosen | chosen/torch.save "
        "| int8 chosen | int8/torch.save | accuracy | accuracy int8 file |"
    )
    print("|---:" * 11 + "|")
    for r in sizes:
        acc = f"{r['acc']:.4f} | {r['acc_int8']:.4f}" if "acc" in r else "- | -"
        print(
            f"| {r['sparsity']:.0%} | {r['torch.save']:,} | {r['dense']:,} | {r['bitmask']:,} | {r['csr']:,} "
            f"| {r['chosen']:,} | {r['chosen'] / r['torch.save']:.2%} | {r['int8']:,} "
            f"| {r['int8'] / r['torch.save']:.2%} | {acc} |"
        )
    print(
        "\n| sparsity | batch | dense ms | sparse ms | sparse speedup | thinned ms | thinned speedup | "
        "Linear layers as CSR |"
    )
    print("|---:" * 7 + "|:---|")
    for sparsity, latency in speed:
        replaced = ", ".join(latency.sparse_report.replaced) or "none"
        for b in (1, 64):
            ms = latency.median_ms
            thinned = f"{ms['thinned'][b]:.4f} | {latency.speedup('thinned', b):.2f}x" if "thinned" in ms else "- | -"
            print(
                f"| {sparsity:.0%} | {b} | {ms['dense'][b]:.4f} | {ms['sparse'][b]:.4f} "
                f"| {latency.speedup('sparse', b):.2f}x | {thinned} | {replaced} |"
            )

    print()
    at95 = next((r for r in sizes if abs(r["sparsity"] - 0.95) < 1e-9), None)
    if at95:
        print(
            f"target float32 file <= 12 % of torch.save at 95 %: {at95['chosen'] / at95['torch.save']:.2%} "
            f"({'met' if at95['chosen'] <= 0.12 * at95['torch.save'] else 'MISSED'})"
        )
        print(
            f"target int8 file <= 4 % of torch.save at 95 %: {at95['int8'] / at95['torch.save']:.2%} "
            f"({'met' if at95['int8'] <= 0.04 * at95['torch.save'] else 'MISSED'})"
        )
    from95 = [(s, lat.speedup("sparse", 1)) for s, lat in speed if s >= 0.95 - 1e-9]
    verdict = "met" if from95 and all(x > 1 for _, x in from95) else "MISSED"
    print(
        f"target sparse faster than dense at batch 1 from 95 %: {verdict} "
        f"({', '.join(f'{s:.0%} {x:.2f}x' for s, x in from95)})"
    )
    print(f"\nwall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
