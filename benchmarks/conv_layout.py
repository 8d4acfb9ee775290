"""Training-step time of conv nets with channels-first against channels-last input batches
(``prunelab.training._fast_layout``, which ``fit`` and ``evaluate`` apply on the CPU).

On the CPU, torch's channels-first max-pooling kernel is several times slower than its
channels-last one; a convolution given a channels-last batch returns channels-last maps, so the
pooling after it takes the fast kernel. Each row times an SGD step (forward, backward, update,
batch 64, one thread) in interleaved rounds, the two layouts alternating, and gives the median
over rounds. It also checks that both layouts give the same loss to float rounding, and times
max-pooling alone on a LeNet-5-sized map in both layouts.

    python benchmarks/conv_layout.py [--rounds 7] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.nn import functional as F

import prunelab
from prunelab.training import _fast_layout

MODELS = (("lenet5", {}), ("conv-pool-linear", {"channels": 12}), ("small_conv", {}))


def step_time(model, x, y, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    one, five, _ = os.getloadavg()
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), load average {one:.2f}, {five:.2f} "
        f"({os.cpu_count()} cores); median of {args.rounds} rounds of {args.steps} steps\n"
    )
    print("| model | input | channels-first ms/step | channels-last ms/step | speedup | loss difference |")
    print("|---|---|---:|---:|---:|---:|")
    for name, options in MODELS:
        model = prunelab.build_model(name, input_shape=(1, 28, 28), n_classes=10, seed=0, **options)
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(64, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (64,), generator=generator)
        with torch.no_grad():
            difference = abs(float(F.cross_entropy(model(x), y)) - float(F.cross_entropy(model(_fast_layout(x)), y)))
        inputs = {"first": x, "last": _fast_layout(x)}
        times = {"first": [], "last": []}
        for layout in inputs:  # warm-up
            step_time(model, inputs[layout], y, 3)
        for round_ in range(args.rounds):
            order = ("first", "last") if round_ % 2 == 0 else ("last", "first")
            for layout in order:
                times[layout].append(step_time(model, inputs[layout], y, args.steps))
        first, last = (1000 * statistics.median(times[k]) for k in ("first", "last"))
        print(
            f"| {name} {options or ''} | 1×28×28, batch 64 | {first:.2f} | {last:.2f} | {first / last:.2f}× "
            f"| {difference:.1e} |"
        )
    pool_input = torch.rand(64, 20, 24, 24, generator=torch.Generator().manual_seed(0))  # LeNet-5's conv1 maps
    maps = {"first": pool_input, "last": pool_input.contiguous(memory_format=torch.channels_last)}
    pool_times = {"first": [], "last": []}
    for round_ in range(args.rounds):
        for layout in ("first", "last") if round_ % 2 == 0 else ("last", "first"):
            started = time.perf_counter()
            for _ in range(args.steps):
                F.max_pool2d(maps[layout], 2)
            pool_times[layout].append((time.perf_counter() - started) / args.steps)
    first, last = (1000 * statistics.median(pool_times[k]) for k in ("first", "last"))
    print(
        f"\nmax_pool2d forward on a 64×20×24×24 map: channels-first {first:.2f} ms, "
        f"channels-last {last:.2f} ms ({first / last:.2f}×)"
    )


if __name__ == "__main__":
    main()
