"""Training-step cost of keeping 90 % of the weights masked.

Compares, in one run and on the same data, the training step of a 784-100-10
MLP at batch 64:

* ``unpruned``        – the plain loop, no pruning (the baseline);
* ``prunelab``        – 90 % of the weights pruned by prunelab, masks enforced by
                        the Pruner's optimiser hooks;
* ``torch.nn.utils.prune`` – the same 90 % with PyTorch's built-in
                        re-parametrisation (``weight = weight_orig * weight_mask``
                        recomputed by a forward pre-hook).

Configurations are measured in interleaved rounds (ABCABC…) so drift of the
machine affects all alike; each round times ``--steps`` steps and the table
reports the median per-step time over rounds and its ratio to the baseline.

    python benchmarks/mask_overhead.py [--rounds 15] [--steps 300] [--optimizer sgd adam] [--threads 1 2]

With Adam, every pruning method pays an extra cost that is not masking: the
second moments of pruned entries are exactly zero, and torch's CPU ``sqrt`` is
several times slower on zeros than on normal numbers (the last table of this
script measures it), so ``sqrt(exp_avg_sq)`` in Adam's step slows down.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunelab
from prunelab.pruning import prune


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def setups(optimizer: str, sparsity: float):
    base = build(0)
    plain = copy.deepcopy(base)
    yield "unpruned", plain, make_optimizer(optimizer, plain)

    ours = copy.deepcopy(base)
    opt = make_optimizer(optimizer, ours)
    prune(ours, sparsity).attach(opt)
    yield "prunelab", ours, opt

    theirs = copy.deepcopy(base)
    for layer in (theirs[1], theirs[3]):
        torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
    yield "torch.nn.utils.prune", theirs, make_optimizer(optimizer, theirs)


def time_steps(model, optimizer, xs, ys, steps: int) -> float:
    n_batches = len(xs)
    start = time.perf_counter()
    for i in range(steps):
        x, y = xs[i % n_batches], ys[i % n_batches]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def check_sparsity(name: str, model: nn.Module, sparsity: float) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    realised = zeros / total
    if name != "unpruned" and abs(realised - sparsity) > 1e-3:
        raise RuntimeError(f"{name}: sparsity drifted to {realised:.4f} during training")
    return realised


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=300, help="steps timed per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--optimizer", nargs="+", choices=["sgd", "adam"], default=["sgd", "adam"])
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch thread counts to measure (default: 1 and torch's default)",
    )
    args = parser.parse_args()
    threads = args.threads or sorted({1, torch.get_num_threads()})

    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(args.batch_size, 1, 28, 28, generator=g) for _ in range(50)]
    ys = [torch.randint(0, 10, (args.batch_size,), generator=g) for _ in range(50)]
    print(
        f"prunelab {prunelab.__version__}, torch {torch.__version__}; "
        f"784-100-10 MLP, batch {args.batch_size}, sparsity {args.sparsity:g}; "
        f"median of {args.rounds} interleaved rounds x {args.steps} steps"
    )
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for optimizer in args.optimizer:
            report(optimizer, args, xs, ys)
    sqrt_table()


def report(optimizer: str, args, xs, ys) -> None:
    configs = list(setups(optimizer, args.sparsity))
    for _, model, opt in configs:  # warm-up
        time_steps(model, opt, xs, ys, 50)
    times = {name: [] for name, _, _ in configs}
    for _ in range(args.rounds):
        for name, model, opt in configs:
            times[name].append(time_steps(model, opt, xs, ys, args.steps))
    baseline = statistics.median(times["unpruned"])
    print(
        f"\n{optimizer}, {torch.get_num_threads()} thread(s)\n{'configuration':<22} {'us/step':>9} {'min':>9} {'max':>9} {'vs unpruned':>12} "
        f"{'sparsity':>9}"
    )
    for name, model, _ in configs:
        med = statistics.median(times[name])
        realised = check_sparsity(name, model, args.sparsity)
        print(
            f"{name:<22} {med * 1e6:9.1f} {min(times[name]) * 1e6:9.1f} {max(times[name]) * 1e6:9.1f} "
            f"{med / baseline:11.3f}x {realised:9.3f}"
        )


def sqrt_table(n: int = 2000) -> None:
    """torch.sqrt on 78 400 zeros vs 78 400 small positive numbers (Adam's denominator)."""
    cases = {"zeros": torch.zeros(78_400), "1e-8": torch.full((78_400,), 1e-8)}
    print(f"\ntorch.sqrt over 78,400 floats (one 784x100 weight)\n{'input':<22} {'us/call':>9} {'vs 1e-8':>12}")
    timings = {}
    for name, x in cases.items():
        x.sqrt()
        start = time.perf_counter()
        for _ in range(n):
            x.sqrt()
        timings[name] = (time.perf_counter() - start) / n
    for name, seconds in timings.items():
        print(f"{name:<22} {seconds * 1e6:9.1f} {seconds / timings['1e-8']:11.2f}x")


if __name__ == "__main__":
    main()
