"""Second-order pruning cost: Hessians + prune LeNet-300-100 to 7 % kept with each solver.

Configurations, all on the same trained LeNet-300-100 and the same calibration inputs:

* ``lobs``, ``obs-exact``, ``obs-fast`` (sequential mode) — prunelab's, end to end:
  layer Hessians by one matrix product per layer, Cholesky inverses, the solvers;
* ``woodbury baseline`` — the straightforward structure of the original L-OBS code:
  each layer's inverse Hessian built by the per-sample Woodbury recursion
  ``H⁻¹ ← H⁻¹ − (H⁻¹x)(xᵀH⁻¹)/(n + xᵀH⁻¹x)`` from ``H⁻¹ = αI`` (α set so its damping
  equals prunelab's), then the paper's pruning one weight at a time in a Python loop.
  Same Hessians (parallel mode), same ranking, same updates: its result is checked
  against prunelab's ``lobs`` in parallel mode.

Also the Hessian-inverse part alone (matrix product + Cholesky vs the recursion), and, if
``benchmarks/obd_cost.py`` is present, the OBD diagonal against a training epoch.

    python benchmarks/second_order.py [--n 10000] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

import prunelab
from prunelab.pruning import prune
from prunelab.pruning.lobs import hessian
from prunelab.pruning.targets import resolve_targets

SPARSITY = 0.93          # 7 % of the weights kept, in every layer
DAMPING = 1e-2


def trained_lenet(n: int):
    try:
        ds = prunelab.load_dataset("mnist")
        source = "MNIST"
    except (FileNotFoundError, ValueError):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(max(n, 2000), 1, 28, 28, generator=g)
        ds = prunelab.data.Dataset("random", x, (x.flatten(1)[:, :10].argmax(1)), x[:500],
                                   x[:500].flatten(1)[:, :10].argmax(1), 10, [str(i) for i in range(10)])
        source = "random MNIST-shaped tensors (set PRUNELAB_DATA for MNIST)"
    model = prunelab.build_model("lenet-300-100", dataset=ds, seed=0)
    prunelab.fit(model, ds, epochs=1, lr=0.05, progress=False)
    return model, ds, source


def woodbury_inverse(columns: torch.Tensor, alpha: float) -> torch.Tensor:
    """The original code's per-sample recursion: H⁻¹ = (Σ x xᵀ / n + I/α)⁻¹."""
    n, d = columns.shape
    inv = torch.eye(d, dtype=torch.float64) * alpha
    for x in columns:
        v = inv @ x
        inv -= torch.outer(v, v) / (n + x @ v)
    return inv


def baseline(model, calibration) -> float:
    """Woodbury inverses + one-weight-at-a-time L-OBS pruning, in place; returns seconds."""
    started = time.perf_counter()
    targets = resolve_targets(model)
    stats = hessian.collect(model, targets, [calibration])     # inputs only, to feed the recursion
    with torch.no_grad():
        for target in targets:
            h = stats[target.name]
            inputs = []
            hook = target.module.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
            model(calibration[0])
            hook.remove()
            cols = torch.cat([inputs[0].double(), torch.ones(len(inputs[0]), 1, dtype=torch.float64)], 1)
            H = h.H
            alpha = 1.0 / (DAMPING * float(torch.diagonal(H).mean()))
            inv = woodbury_inverse(cols, alpha)
            W = torch.cat([target.weight.double(), target.module.bias.double()[:, None]], 1)
            d_in = W.shape[1] - 1
            L = W[:, :d_in].pow(2) / (2 * torch.diagonal(inv)[:d_in])
            order = torch.argsort(L.flatten(), stable=True)[: round(SPARSITY * L.numel())]
            pruned = torch.zeros_like(W, dtype=torch.bool)
            for flat in order.tolist():                          # one weight at a time
                r, q = divmod(flat, d_in)
                W[r] -= W[r, q] / inv[q, q] * inv[q]
                pruned[r, q] = True
                W[r][pruned[r]] = 0.0
            target.weight.copy_(W[:, :d_in].float())
            target.module.bias.copy_(W[:, d_in].float())
    return time.perf_counter() - started


def timed_prune(model, calibration, criterion) -> float:
    started = time.perf_counter()
    prune(model, SPARSITY, criterion=criterion, data=calibration, batch_size=len(calibration[0]))
    return time.perf_counter() - started


def inverse_only(model, calibration) -> tuple[float, float]:
    targets = resolve_targets(model)
    started = time.perf_counter()
    stats = hessian.collect(model, targets, [calibration])
    for target in targets:
        H = stats[target.name].H
        H = H + DAMPING * torch.diagonal(H).mean() * torch.eye(len(H), dtype=H.dtype)
        torch.cholesky_inverse(torch.linalg.cholesky(H))
    ours = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        inputs = {}
        hooks = [t.module.register_forward_hook(lambda m, i, o, name=t.name: inputs.__setitem__(name, i[0]))
                 for t in targets]
        model(calibration[0])
        for h in hooks:
            h.remove()
        for target in targets:
            cols = torch.cat([inputs[target.name].double(),
                              torch.ones(len(inputs[target.name]), 1, dtype=torch.float64)], 1)
            woodbury_inverse(cols, 1e4)
    return ours, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="calibration images")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ds, source = trained_lenet(args.n)
    calibration = (ds.x_train[: args.n], ds.y_train[: args.n])
    print(f"prunelab {prunelab.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"LeNet-300-100 trained 1 epoch on {source}; {len(calibration[0])} calibration images; "
          f"every layer to {1 - SPARSITY:.0%} kept\n")

    base_model = copy.deepcopy(model)
    base_seconds = baseline(base_model, calibration)
    check = copy.deepcopy(model)
    prune(check, SPARSITY, criterion={"name": "lobs", "mode": "parallel", "damping": DAMPING},
          data=calibration, batch_size=len(calibration[0]))
    diff = max(float((a - b).abs().max()) for a, b in zip(check.parameters(), base_model.parameters()))

    rows = [("woodbury baseline (paper's lobs)", base_seconds, prunelab.evaluate(base_model, ds)["accuracy"])]
    for criterion in ("lobs", "obs-exact", "obs-fast"):
        m = copy.deepcopy(model)
        seconds = timed_prune(m, calibration, {"name": criterion, "damping": DAMPING})
        rows.append((criterion, seconds, prunelab.evaluate(m, ds)["accuracy"]))
    print(f"{'configuration':<34} {'seconds':>9} {'vs baseline':>12} {'accuracy after prune':>21}")
    for name, seconds, accuracy in rows:
        print(f"{name:<34} {seconds:9.2f} {base_seconds / seconds:11.1f}x {accuracy:21.4f}")
    print(f"\nbaseline vs prunelab lobs (parallel mode): max |weight difference| = {diff:.2e}")
    ours, theirs = inverse_only(model, calibration)
    print(f"Hessians + inverses only: prunelab {ours:.2f} s, per-sample Woodbury {theirs:.2f} s "
          f"({theirs / ours:.0f}x)")
    targets = {"obs-fast": 2.0, "obs-exact": 30.0}
    for name, seconds, _ in rows[1:]:
        if name in targets:
            print(f"target {name} under {targets[name]:g} s: {'met' if seconds < targets[name] else 'NOT met'}; "
                  f"10x faster than the baseline: {'met' if base_seconds / seconds >= 10 else 'NOT met'}")
    obd = os.path.join(os.path.dirname(__file__), "obd_cost.py")
    if os.path.exists(obd):
        print("\n--- OBD diagonal vs a training epoch (benchmarks/obd_cost.py) ---", flush=True)
        os.system(f"{sys.executable} {obd}")


if __name__ == "__main__":
    main()
