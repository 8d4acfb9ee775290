"""Does ``prunelab.measure_latency`` see more work as more time?

A sanity check of the latency metric, moved out of the unit tests (a timing assertion fails
on a busy machine): stacks of 1, 2 and 4 ``Linear(512, 512)`` + ReLU layers at batch 64 do
1x, 2x and 4x the multiply-adds; their median latencies, best of ``--rounds`` interleaved
rounds, should grow about as much. The table prints each stack's per-sample time and its
ratio to the one-layer stack; the exit status is 1 when the four-layer stack does not
measure at least 1.5x the one-layer one (the check the unit test used to make).

    python benchmarks/latency_scaling.py [--rounds 3] [--repeats 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from prunelab.metrics import measure_latency


def stack(n_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n_layers):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    return nn.Sequential(*layers)


def best_per_sample_us(depths: list[int], rounds: int, repeats: int, threads: int) -> dict[int, float]:
    """Best (lowest) median per-sample microseconds of each stack over interleaved rounds."""
    torch.manual_seed(0)
    models = {depth: stack(depth) for depth in depths}
    best = {depth: math.inf for depth in depths}
    for _ in range(rounds):
        for depth, model in models.items():
            (result,) = measure_latency(model, (512,), batch_sizes=(64,), warmup=3, repeats=repeats, threads=threads)
            best[depth] = min(best[depth], result.per_sample_us)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    best = best_per_sample_us([1, 2, 4], args.rounds, args.repeats, args.threads)
    print(f"Linear(512, 512) stacks at batch 64, {args.threads} thread(s), best of {args.rounds} rounds")
    print("| layers | us/sample | vs 1 layer |\n|---|---|---|")
    for depth, us in best.items():
        print(f"| {depth} | {us:.2f} | {us / best[1]:.2f}x |")
    ok = best[4] > 1.5 * best[1]
    print("ok: the four-layer stack measures slower" if ok else "FAIL: four layers did not measure 1.5x one layer")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
