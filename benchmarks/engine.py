"""Training throughput of many small pruned models: a plain loop, prunelab one model at a
time, and prunelab's batched engine, against the machine's own limits measured in the same run.

For the 784-100-10 MLP at batch 16 and 64 and LeNet-5 at batch 64, on MNIST-shaped synthetic
data (60,000 images; step time does not depend on the values), 90 % of the weights pruned by
magnitude, SGD with momentum 0.9:

* (a) a plain PyTorch loop with ``torch.nn.utils.prune`` (weight = weight_orig · mask in a hook);
* (b) ``prunelab.fit`` with a one-shot Pruner attached (one model at a time);
* (c) ``prunelab.engine.fit_batched`` with R = 8, 32, 128 members, each with its own mask;
* (d) the machine's float32 matmul rate (2048² · 2048 products);
* (e) the memory-traffic bound of the optimiser: every step reads and writes each member's
  weights, gradients and momentum and reads its masks (7 floats per weight); at the measured
  copy bandwidth (a 256 MiB ``copy_``, counted as read + write) that bounds the steps per second
  of any implementation.

Throughput is model-epochs per second (one model seeing the 60,000 images once) and achieved
GFLOP/s, counting 3 × the forward FLOPs of the dense model per image (forward, and the two
backward products). Targets on 2 cores: batched ≥ 5× the plain loop at batch 16 and 64, and
≥ 40 % of the matmul rate at batch 64.

    python benchmarks/engine.py [--steps 60] [--members 8 32 128] [--threads 2] [--cases mlp16 mlp64 lenet64]
                                [--repeats 3]

Each row reports the fastest of ``--repeats`` interleaved rounds: the host is shared, and its
speed drifts by ±30 % within minutes.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunelab
from prunelab.engine import BatchedModels, fit_batched

N = 60_000
CASES = {
    "mlp16": ("mlp", {"hidden": [100]}, 16),
    "mlp64": ("mlp", {"hidden": [100]}, 64),
    "lenet64": ("lenet5", {}, 64),
}
SPARSITY = 0.9


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, 28, 28, generator=g), torch.randint(0, 10, (N,), generator=g)


def build(name: str, options: dict, seed: int) -> nn.Module:
    return prunelab.build_model(name, input_shape=(1, 28, 28), n_classes=10, seed=seed, **options)


def train_flops_per_image(model: nn.Module) -> float:
    return 3 * prunelab.summary(model, (1, 28, 28)).total.flops_dense


def matmul_gflops(repeats: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times) / 1e9


def copy_gbytes(repeats: int = 5) -> float:
    src = torch.empty(64 * 2**20)  # 256 MiB of float32
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times) / 1e9


def plain_loop(name, options, batch_size, x, y, steps) -> float:
    """Seconds per step of a plain loop with torch.nn.utils.prune masks."""
    model = build(name, options, 0)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            torch_prune.l1_unstructured(module, "weight", amount=SPARSITY)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = torch.randperm(N)
    start = None
    for step in range(steps + 5):
        if step == 5:
            start = time.perf_counter()
        idx = order[(step * batch_size) % N : (step * batch_size) % N + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def prunelab_single(name, options, batch_size, x, y, steps) -> float:
    model = build(name, options, 0)
    pruner = prunelab.prune(model, SPARSITY)
    prunelab.fit(model, (x, y), epochs=1, batch_size=batch_size, lr=0.01, pruner=pruner, max_steps=5, progress=False)
    start = time.perf_counter()
    prunelab.fit(
        model, (x, y), epochs=1, batch_size=batch_size, lr=0.01, pruner=pruner, max_steps=steps, progress=False
    )
    return (time.perf_counter() - start) / steps


def batched(name, options, batch_size, x, y, steps, members) -> float:
    models = [build(name, options, seed) for seed in range(members)]
    masks = {}
    for model in models:
        pruner = prunelab.prune(model, SPARSITY)
        for t in pruner.targets:
            masks.setdefault(t.name, []).append(pruner.mask(t.name))
    batch = BatchedModels(models)
    batch.set_masks({n: torch.stack(m) for n, m in masks.items()})
    seeds = list(range(members))
    fit_batched(batch, (x, y), seeds=seeds, epochs=1, batch_size=batch_size, lr=0.01, max_steps=3)
    start = time.perf_counter()
    fit_batched(batch, (x, y), seeds=seeds, epochs=1, batch_size=batch_size, lr=0.01, max_steps=steps)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    parser.add_argument("--members", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds over all rows; each row reports its fastest round (the host is shared, "
        "and interleaved rounds let every row see the same conditions)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = data()
    load = os.getloadavg()[0]
    timers = {}
    for case in args.cases:
        name, options, batch_size = CASES[case]
        timers[case, "(a) plain + nn.utils.prune", 1] = lambda c=(name, options, batch_size): plain_loop(
            *c, x, y, args.steps
        )
        timers[case, "(b) prunelab single", 1] = lambda c=(name, options, batch_size): prunelab_single(
            *c, x, y, args.steps
        )
        for members in args.members:
            timers[case, "(c) prunelab batched", members] = lambda c=(name, options, batch_size), members=members: (
                batched(*c, x, y, max(5, args.steps // 4), members)
            )
    # interleaved rounds: every row, and the machine's limits, measured once per round; keep the best
    best = dict.fromkeys(timers, float("inf"))
    matmul = bandwidth = 0.0
    for _ in range(args.repeats):
        matmul, bandwidth = max(matmul, matmul_gflops()), max(bandwidth, copy_gbytes())
        for key, timer in timers.items():
            best[key] = min(best[key], timer())
    print(
        f"prunelab {prunelab.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} cores, load {load:.2f}; {args.steps} timed steps per row, best of {args.repeats} rounds"
    )
    print(f"(d) float32 matmul: {matmul:.1f} GFLOP/s; copy bandwidth: {bandwidth:.1f} GB/s\n")
    header = (
        "case",
        "engine",
        "R",
        "ms/step",
        "model-epochs/s",
        "× plain",
        "GFLOP/s",
        "% matmul",
        "traffic bound m-e/s",
        "% bound",
    )
    rows = []
    plain = {}
    for (case, engine, members), seconds in best.items():
        name, options, batch_size = CASES[case]
        model = build(name, options, 0)
        flops = train_flops_per_image(model)
        weights = sum(p.numel() for p in model.parameters())
        steps_per_epoch = N / batch_size
        # (e) 7 floats of traffic per weight and member per step, at the measured bandwidth; the
        # traffic grows with R, so the bound in model-epochs/s does not
        bound = bandwidth * 1e9 / (7 * 4 * weights) / steps_per_epoch
        model_epochs = members / (seconds * steps_per_epoch)
        gflops = members * batch_size * flops / seconds / 1e9
        plain.setdefault(case, model_epochs)
        rows.append(
            (
                case,
                engine,
                str(members),
                f"{1e3 * seconds:.3f}",
                f"{model_epochs:.2f}",
                f"{model_epochs / plain[case]:.1f}×",
                f"{gflops:.1f}",
                f"{100 * gflops / matmul:.0f} %",
                f"{bound:.1f}",
                f"{100 * model_epochs / bound:.0f} %",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
