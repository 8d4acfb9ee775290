"""Cost of the OBD Hessian diagonal against one plain training epoch.

For each model (LeNet-300-100 and LeNet-5 on MNIST-shaped 1×28×28 inputs, 10
classes), on the same ``--n`` images in the same batches of 128:

* ``train epoch``  – one epoch of plain SGD (momentum 0.9): forward, backward, step
                     (the baseline);
* ``obd exact``    – the exact GGN diagonal of the mean cross-entropy over the
                     epoch's data (``OBD(mode="exact")``: 10 back-propagated columns);
* ``obd mc``       – its Monte-Carlo estimate with one sampled label per image
                     (``OBD(mode="mc", samples=1)``).

OBD is computed on the model as trained by the timed epoch. Real MNIST is used
when ``$PRUNELAB_DATA`` holds it, otherwise random tensors of MNIST shape (the
timings do not depend on the values); the output says which. With ``--repeats``
> 1 the three are measured in interleaved rounds and the median is reported.
Target: the OBD diagonal for one epoch costs at most 3× a training epoch.

    python benchmarks/obd_cost.py [--n 60000] [--models lenet-300-100 lenet5] [--repeats 1] [--threads T]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.nn import functional as F

import prunelab
from prunelab.data import DatasetNotFoundError
from prunelab.pruning import OBD
from prunelab.pruning.targets import resolve_targets

TARGET_RATIO = 3.0


def load_data(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if os.environ.get("PRUNELAB_DATA"):
        try:
            ds = prunelab.load_dataset("mnist")
            x, y = ds.x_train[:n], ds.y_train[:n]
            return x, y, f"real MNIST from $PRUNELAB_DATA ({len(x)} training images)"
        except DatasetNotFoundError:
            pass
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, f"random tensors of MNIST shape ({n} images; MNIST not found in $PRUNELAB_DATA)"


def train_epoch(model, optimizer, batches) -> float:
    model.train()
    start = time.perf_counter()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start


def obd_epoch(model, batches, **options) -> float:
    criterion, targets = OBD(**options), resolve_targets(model)
    start = time.perf_counter()
    criterion.calibrate(model, targets, batches, F.cross_entropy)
    elapsed = time.perf_counter() - start
    if criterion.n_samples != sum(len(x) for x, _ in batches):
        raise RuntimeError("OBD did not see every image")
    return elapsed


def measure(name: str, batches, repeats: int) -> dict[str, float]:
    model = prunelab.build_model(name, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    warm = batches[:3]  # allocator and kernel warm-up
    train_epoch(model, optimizer, warm)
    obd_epoch(model, warm)
    obd_epoch(model, warm, mode="mc")
    times = {"train": [], "exact": [], "mc": []}
    for _ in range(repeats):
        times["train"].append(train_epoch(model, optimizer, batches))
        times["exact"].append(obd_epoch(model, batches))
        times["mc"].append(obd_epoch(model, batches, mode="mc", samples=1))
    out = {key: statistics.median(values) for key, values in times.items()}
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60000, help="training images used (of 60000)")
    parser.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet5"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    x, y, source = load_data(args.n)
    size = args.batch_size
    batches = [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]
    print(
        f"prunelab {prunelab.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"data: {source}; batch {args.batch_size} ({len(batches)} batches); "
        f"median of {args.repeats} round(s)"
    )
    header = (
        f"{'model':<15} {'params':>8} {'train epoch s':>14} {'obd exact s':>12} {'ratio':>7} "
        f"{'obd mc(1) s':>12} {'ratio':>7}  target <= {TARGET_RATIO:g}x"
    )
    print(header)
    print("-" * len(header))
    for name in args.models:
        t = measure(name, batches, args.repeats)
        exact, mc = t["exact"] / t["train"], t["mc"] / t["train"]
        verdict = ", ".join(
            f"{mode} {'met' if r <= TARGET_RATIO else 'NOT met'}" for mode, r in (("exact", exact), ("mc", mc))
        )
        print(
            f"{name:<15} {t['params']:>8,} {t['train']:>14.2f} {t['exact']:>12.2f} {exact:>6.2f}x "
            f"{t['mc']:>12.2f} {mc:>6.2f}x  {verdict}"
        )


if __name__ == "__main__":
    main()
