"""Cost of the layer-wise OBS solvers at scale (issue 16): obs-fast on one 1024×4096 Linear
layer, and a ResNet-50-shaped net (bottleneck blocks, hand-written) pruned 50 % by obs-fast in
sequential mode — with the cached-block Hessians and with the old one full forward per layer,
in the same run.

    OMP_NUM_THREADS=2 python benchmarks/lobs_scale.py [--images 32] [--size 64] [--skip-old]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.nn import functional as F

from prunelab.pruning import prune
from prunelab.pruning.lobs import LayerwiseOBS, hessian, obs_fast


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50's layout: stem, stages of 3, 4, 6, 3 bottlenecks, 1000-way head (54 layers)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, cin = [], 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (j == 0 and i > 0) else 1))
                cin = width * 4
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def one_layer(rows=1024, cols=4096, n=2048):
    torch.manual_seed(0)
    layer = nn.Linear(cols, rows)
    x = torch.randn(n, cols)
    start = time.perf_counter()
    pruner = prune(layer, 0.5, criterion="obs-fast", data=[(x,)])
    total = time.perf_counter() - start
    r = pruner.history[-1].report[0]
    # the solver alone, on the same damped Hessian (with the bias row/column), as the driver calls it
    layer = nn.Linear(cols, rows)
    torch.manual_seed(0)
    layer = nn.Linear(cols, rows)
    X = torch.cat([x, torch.ones(n, 1)], dim=1)
    H = (X.T @ X).double() / n
    H.diagonal().add_(0.01 * H.diagonal().mean())
    W = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach().double()
    prunable = torch.ones(cols + 1, dtype=torch.bool)
    prunable[-1] = False
    start = time.perf_counter()
    obs_fast.solve(W, H, rows * cols // 2, prunable, torch.ones_like(W, dtype=torch.bool))
    solver = time.perf_counter() - start
    return total, r.hessian_seconds, r.solve_seconds, solver


def resnet(images, size, old):
    torch.manual_seed(0)
    model = ResNet50().eval()
    data = [(torch.randn(images, 3, size, size),)]
    if old:
        saved = LayerwiseOBS._hessian
        LayerwiseOBS._hessian = lambda self, pruner, target: hessian.collect(
            pruner.model, [target], self._batches, with_bias=self.update_bias
        )[target.name]
    try:
        start = time.perf_counter()
        pruner = prune(model, 0.5, criterion="obs-fast", data=data)
        seconds = time.perf_counter() - start
    finally:
        if old:
            LayerwiseOBS._hessian = saved
    totals = pruner.history[-1].report.totals()
    return seconds, totals, pruner.criterion.last_forwards, model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--skip-old", action="store_true")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    total, h, s, solver = one_layer()
    print(
        f"obs-fast, one Linear 1024x4096 (2048 columns): {total:.2f} s through prune (hessian {h:.2f} s, "
        f"solve and report {s:.2f} s); the solver alone {solver:.2f} s"
    )
    new = resnet(args.images, args.size, old=False)
    rows = [("cached blocks (new)", new)]
    if not args.skip_old:
        old = resnet(args.images, args.size, old=True)
        rows.append(("full forward per layer (old)", old))
        same = all(torch.equal(p, q) for p, q in zip(new[3].parameters(), old[3].parameters()))
    print(f"\nResNet-50-shaped net, obs-fast 50 % sequential, {args.images} images of {args.size}x{args.size}")
    print(f"{'mode':<30} {'total s':>8} {'hessian s':>10} {'solve s':>8}  forwards (batches)")
    for name, (seconds, totals, forwards, _) in rows:
        print(f"{name:<30} {seconds:8.1f} {totals['hessian_seconds']:10.1f} {totals['solve_seconds']:8.1f}  {forwards}")
    if len(rows) == 2:
        print(f"speed-up {rows[1][1][0] / rows[0][1][0]:.2f}x; identical weights: {same}")


if __name__ == "__main__":
    main()
