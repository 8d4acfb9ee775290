"""Second-order pruning cost: Hessians + prune LeNet-300-100 to 7 % kept with each solver.

For each solver, two implementations of the *same* pruning, on the same trained
LeNet-300-100, the same calibration images and the Hessians of the unpruned model
(parallel mode):

* prunelab's — one matrix product per layer for ``X̃ᵀX̃``, Cholesky inverses, and the solver
  as shipped (vectorised rounds for ``lobs``, batched and compacted greedy for ``obs-exact``,
  lazy blocked updates for ``obs-fast``);
* a straightforward one, structured like the original L-OBS code: each layer's inverse
  Hessian built by the per-sample Woodbury recursion
  ``H⁻¹ ← H⁻¹ − (H⁻¹x)(xᵀH⁻¹)/(n + xᵀH⁻¹x)`` from ``H⁻¹ = αI`` (α chosen so the damping
  equals prunelab's), then the solver's loop written plainly: one weight at a time
  (``lobs``), one row at a time with full-size down-dates (``obs-exact``), every later
  column updated after each column (``obs-fast``).

Targets: whole-network ``obs-fast`` under 2 s and ``obs-exact`` under 30 s; each at least
10x faster than its straightforward version. Also shown: the Hessian-inverse part alone,
and (``benchmarks/obd_cost.py``) the OBD diagonal against a training epoch.

    python benchmarks/second_order.py [--n 10000] [--threads 2] [--skip-obd]
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time

import torch

import prunelab
from prunelab.pruning import prune
from prunelab.pruning.lobs import hessian
from prunelab.pruning.lobs.obs_exact import optimal_row
from prunelab.pruning.targets import resolve_targets

SPARSITY = 0.93  # 7 % of the weights kept, in every layer
DAMPING = 1e-2


def trained_lenet():
    try:
        ds = prunelab.load_dataset("mnist")
        source = "MNIST"
    except (FileNotFoundError, ValueError):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(12000, 1, 28, 28, generator=g)
        y = x.flatten(1)[:, :10].argmax(1)
        ds = prunelab.data.Dataset("random", x, y, x[:2000], y[:2000], 10, [str(i) for i in range(10)])
        source = "random MNIST-shaped tensors (set PRUNELAB_DATA for MNIST)"
    model = prunelab.build_model("lenet-300-100", dataset=ds, seed=0)
    prunelab.fit(model, ds, epochs=1, lr=0.05, progress=False)
    return model, ds, source


# ---------------------------------------------------------------- straightforward
def woodbury_inverse(columns: torch.Tensor, alpha: float) -> torch.Tensor:
    """The original code's per-sample recursion: H⁻¹ = (Σ x̃ x̃ᵀ / n + I/α)⁻¹."""
    n, d = columns.shape
    inv = torch.eye(d, dtype=torch.float64) * alpha
    for x in columns:
        v = inv @ x
        inv -= torch.outer(v, v) / (n + x @ v)
    return inv


def layer_inputs(model, x) -> dict:
    """Each Linear's input on the unpruned model, with the bias column: (n, d+1), float64."""
    inputs, hooks = {}, []
    for t in resolve_targets(model):
        hooks.append(
            t.module.register_forward_hook(lambda m, i, o, name=t.name: inputs.__setitem__(name, i[0].detach()))
        )
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {k: torch.cat([v.double(), torch.ones(len(v), 1, dtype=torch.float64)], 1) for k, v in inputs.items()}


def naive_lobs(W, inv, d_in):
    L = W[:, :d_in].pow(2) / (2 * torch.diagonal(inv)[:d_in])
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for flat in torch.argsort(L.flatten(), stable=True)[: round(SPARSITY * L.numel())].tolist():
        r, q = divmod(flat, d_in)
        W[r] -= W[r, q] / inv[q, q] * inv[q]
        pruned[r, q] = True
        W[r][pruned[r]] = 0.0
    return W


def naive_exact(W, inv, d_in, H):
    rows = len(W)
    orders, incs = [], []
    for r in range(rows):  # one row at a time, full-size down-dates
        w, A = W[r].clone(), inv.clone()
        alive = torch.ones(W.shape[1], dtype=torch.bool)
        alive[d_in:] = False
        order, inc = [], []
        for _ in range(d_in):
            score = torch.where(alive, w * w / torch.diagonal(A).clamp_min(1e-300), float("inf"))
            q = int(torch.argmin(score))
            col = A[:, q].clone()
            inc.append(float(w[q] ** 2 / col[q]))
            w -= w[q] / col[q] * col
            w[q] = 0.0
            A -= torch.outer(col, col) / col[q]
            alive[q] = False
            order.append(q)
        orders.append(order)
        incs.append(torch.tensor(inc, dtype=torch.float64))
    price = torch.cummax(torch.stack(incs), dim=1).values
    taken = torch.zeros(price.numel(), dtype=torch.bool)
    taken[torch.argsort(price.flatten(), stable=True)[: round(SPARSITY * rows * d_in)]] = True
    counts = taken.reshape(rows, d_in).sum(1)
    for r in range(rows):
        keep = torch.ones(W.shape[1], dtype=torch.bool)
        keep[orders[r][: counts[r]]] = False
        W[r] = optimal_row(W[r], H, keep)
    return W


def naive_fast(W, inv, d_in, block=128):
    """SparseGPT's pruning, unblocked: the same per-block masks (128 columns, cumulative
    rounding), but every later column is updated after each column."""
    U = torch.linalg.cholesky(inv, upper=True)
    seen = taken = 0
    for i in range(d_in):
        if i % block == 0:  # choose the next block's mask
            j = min(i + block, d_in)
            score = W[:, i:j].pow(2) / torch.diagonal(U)[i:j].pow(2)
            seen += score.numel()
            n = round(SPARSITY * seen) - taken
            taken += n
            mask = torch.zeros(score.numel(), dtype=torch.bool)
            mask[torch.argsort(score.flatten(), stable=True)[:n]] = True
            mask = mask.reshape(score.shape)
        q = torch.where(mask[:, i % block], torch.zeros_like(W[:, i]), W[:, i])
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]  # every later column, every time
        W[:, i] = q
    return W


def straightforward(model, calibration, solver: str) -> float:
    started = time.perf_counter()
    inputs = layer_inputs(model, calibration[0])
    with torch.no_grad():
        for t in resolve_targets(model):
            cols = inputs[t.name]
            H = cols.T @ cols / len(cols)
            alpha = 1.0 / (DAMPING * float(torch.diagonal(H).mean()))
            inv = woodbury_inverse(cols, alpha)
            W = torch.cat([t.weight.double(), t.module.bias.double()[:, None]], 1)
            d_in = W.shape[1] - 1
            if solver == "lobs":
                W = naive_lobs(W, inv, d_in)
            elif solver == "obs-exact":
                W = naive_exact(W, inv, d_in, H + torch.eye(len(H), dtype=H.dtype) / alpha)
            else:
                W = naive_fast(W, inv, d_in)
            t.weight.copy_(W[:, :d_in].float())
            t.module.bias.copy_(W[:, d_in].float())
    return time.perf_counter() - started


def ours(model, calibration, solver: str) -> float:
    started = time.perf_counter()
    prune(
        model,
        SPARSITY,
        criterion={"name": solver, "mode": "parallel", "damping": DAMPING},
        data=calibration,
        batch_size=len(calibration[0]),
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="calibration images")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-obd", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, ds, source = trained_lenet()
    calibration = (ds.x_train[: args.n], ds.y_train[: args.n])
    print(
        f"prunelab {prunelab.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"LeNet-300-100 trained 1 epoch on {source}; {len(calibration[0])} calibration images; "
        f"every layer to {1 - SPARSITY:.0%} kept; parallel mode\n",
        flush=True,
    )
    print(
        f"{'solver':<10} {'prunelab s':>11} {'accuracy':>9} {'straightforward s':>18} {'accuracy':>9} "
        f"{'speedup':>8} {'target':>22}"
    )
    limits = {"obs-fast": 2.0, "obs-exact": 30.0}
    for solver in ("lobs", "obs-exact", "obs-fast"):
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        fast = ours(a, calibration, solver)
        slow = straightforward(b, calibration, solver)
        acc_a, acc_b = (prunelab.evaluate(m, ds)["accuracy"] for m in (a, b))
        verdict = [f"{slow / fast:.0f}x {'>=' if slow / fast >= 10 else '<'} 10x"]
        if solver in limits:
            verdict.append(f"{'<' if fast < limits[solver] else '>='} {limits[solver]:g} s")
        print(
            f"{solver:<10} {fast:11.2f} {acc_a:9.4f} {slow:18.2f} {acc_b:9.4f} {slow / fast:7.1f}x "
            f"{', '.join(verdict):>22}",
            flush=True,
        )
    inputs = layer_inputs(model, calibration[0])
    started = time.perf_counter()
    stats = hessian.collect(model, resolve_targets(model), [calibration])
    for h in stats.values():
        H = h.H + DAMPING * torch.diagonal(h.H).mean() * torch.eye(len(h.H), dtype=torch.float64)
        torch.cholesky_inverse(torch.linalg.cholesky(H))
    fast = time.perf_counter() - started
    started = time.perf_counter()
    for cols in inputs.values():
        woodbury_inverse(cols, 1e4)
    slow = time.perf_counter() - started
    print(f"\nHessians + inverses only: prunelab {fast:.2f} s, per-sample Woodbury {slow:.2f} s ({slow / fast:.0f}x)")
    obd = os.path.join(os.path.dirname(os.path.abspath(__file__)), "obd_cost.py")
    if not args.skip_obd and os.path.exists(obd):
        print("\n--- OBD diagonal vs a training epoch (benchmarks/obd_cost.py) ---", flush=True)
        subprocess.run([sys.executable, obd], check=False)


if __name__ == "__main__":
    main()
