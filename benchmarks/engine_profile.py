"""Where a batched training step spends its time (the figures behind docs/engine.md).

1. 784-100-10 MLP, R members at batch B (default 32 × 16), 90 % masked: time of the forward pass
   and of forward + backward through vmap + autograd, and of one step of each engine path; then
   torch.profiler's top operators of the vmap forward + backward.
2. LeNet-5, R = 8 at batch 64: one forward + backward through vmap, through grouped convolutions
   (the members folded into the channels, ``groups=R``), and for the R models one after another.

    python benchmarks/engine_profile.py [--members 32] [--batch 16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import prunelab
from prunelab.engine import BatchedModels
from prunelab.engine.batched import _mlp_step, mlp_plan


def timeit(f, n: int = 20) -> float:
    for _ in range(3):
        f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e3


def mlp_part(R: int, B: int) -> None:
    models = [
        prunelab.build_model("mlp", input_shape=(1, 28, 28), n_classes=10, hidden=[100], seed=s) for s in range(R)
    ]
    batch = BatchedModels(models)
    batch.set_masks({n: (torch.rand_like(p) > 0.9).float() for n, p in batch.params.items() if n.endswith("weight")})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(R, B, 1, 28, 28, generator=g), torch.randint(0, 10, (R, B), generator=g)

    def zero():
        for p in batch.params.values():
            p.grad = None

    def forward():
        with torch.no_grad():
            batch(x)

    def vmap_step():
        zero()
        F.cross_entropy(batch(x).flatten(0, 1), y.flatten()).backward()

    plan = mlp_plan(models[0])
    grads = {name: torch.zeros_like(p) for name, p in batch.params.items()}

    def hand_step():
        zero()
        _mlp_step(batch.params, grads, plan, x, y)

    print(f"784-100-10, R = {R}, batch {B}, {torch.get_num_threads()} thread(s)")
    print(f"  vmap forward             {timeit(forward):7.3f} ms")
    print(f"  vmap forward + backward  {timeit(vmap_step):7.3f} ms")
    print(f"  hand forward + backward  {timeit(hand_step):7.3f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            vmap_step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=6))


def lenet_part(R: int = 8, B: int = 64) -> None:
    models = [prunelab.build_model("lenet5", input_shape=(1, 28, 28), n_classes=10, seed=s) for s in range(R)]
    batch = BatchedModels(models)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(R, B, 1, 28, 28, generator=g), torch.randint(0, 10, (R, B), generator=g)
    P = {k: v.detach().clone().requires_grad_() for k, v in batch.params.items()}

    def vmap_step():
        for p in batch.params.values():
            p.grad = None
        F.cross_entropy(batch(x).flatten(0, 1), y.flatten()).backward()

    def grouped_step():  # LeNet-5: conv → pool → conv → pool → fc → ReLU → fc
        for p in P.values():
            p.grad = None
        h = x.transpose(0, 1).reshape(B, R, 28, 28)
        for name in ("conv1", "conv2"):
            W = P[f"{name}.weight"]
            h = F.max_pool2d(F.conv2d(h, W.reshape(-1, *W.shape[2:]), P[f"{name}.bias"].reshape(-1), groups=R), 2)
        h = h.reshape(B, R, -1).transpose(0, 1)
        h = torch.baddbmm(P["fc1.bias"].unsqueeze(1), h, P["fc1.weight"].transpose(1, 2)).relu()
        out = torch.baddbmm(P["fc2.bias"].unsqueeze(1), h, P["fc2.weight"].transpose(1, 2))
        F.cross_entropy(out.flatten(0, 1), y.flatten()).backward()

    def singles():
        for r, model in enumerate(models):
            model.zero_grad()
            F.cross_entropy(model(x[r]), y[r]).backward()

    print(f"LeNet-5, R = {R}, batch {B}: one forward + backward")
    print(f"  vmap                     {timeit(vmap_step, 5):7.1f} ms")
    print(f"  grouped convolutions     {timeit(grouped_step, 5):7.1f} ms")
    print(f"  {R} single models         {timeit(singles, 5):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    mlp_part(args.members, args.batch)
    lenet_part()


if __name__ == "__main__":
    main()
