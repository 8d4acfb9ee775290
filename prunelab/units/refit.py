"""Least-squares refit of the layer that reads removed units (the structured L-OBS of Dong et al.
2017, applied to transformers; docs/methods.md "Structured transformer pruning").

After some of a layer's input features are removed (an attention head's columns of ``o_proj``, an
MLP's channels of ``down_proj``), the remaining columns can be refit so that the layer's output on
the calibration inputs stays as close as possible to the unpruned layer's output. With the inputs
``x`` (features ``F``, one column per token position, a constant 1 appended when the layer has a
bias), the kept features ``k`` and the targets ``y = A x (+ Δ)`` (``A = [W, b]``, the unpruned
layer; ``Δ`` an optional extra target, e.g. a removed block's change of the residual stream), the
ridge-damped least-squares solution is

    W' = C (G_kk + λI)⁻¹,   C = Σ y x_kᵀ = A G_:k + Σ Δ x_kᵀ,   G = Σ x xᵀ,
    λ = damp · mean(diag G_kk).

Only the Gram ``G`` (with the constant feature) and, for ``Δ``, ``Σ Δ xᵀ`` and ``Σ‖Δ‖²`` are
collected, in float64, over every token position of the calibration batches; the inputs are the
unpruned model's (layer-wise, as L-OBS: every layer is refit on the same dense inputs). The squared
error ``Σ‖y − W' x_k‖²`` follows from the same sums, so each refit reports its relative error on the
calibration data before (the cut weights) and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunelab.units.groups import is_hf_conv1d


@dataclass
class Gram:
    """``Σ x xᵀ`` of a layer's inputs with a constant feature appended (last), over ``count``
    token positions; ``cross = Σ Δ xᵀ`` and ``energy = Σ‖Δ‖²`` of an extra target, if any."""

    xx: torch.Tensor                     # (F + 1, F + 1) float64
    count: int = 0
    cross: torch.Tensor | None = None    # (out, F + 1) float64
    energy: float = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = _tokens(x)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        self.xx += (x.T @ x).cpu()
        self.count += len(x)

    def add_target(self, x: torch.Tensor, delta: torch.Tensor) -> None:
        x, delta = _tokens(x), _tokens(delta)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        cross = (delta.T @ x).cpu()
        self.cross = cross if self.cross is None else self.cross + cross
        self.energy += float(delta.pow(2).sum())

    @property
    def second_moment(self) -> torch.Tensor:
        """``E[x_f²]`` per input feature (without the constant)."""
        return self.xx.diagonal()[:-1] / max(self.count, 1)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(positions, features) in float64: every axis but the last is a position."""
    return x.detach().reshape(-1, x.shape[-1]).double()


def new_gram(features: int) -> Gram:
    return Gram(torch.zeros(features + 1, features + 1, dtype=torch.float64))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a Linear or a Hugging Face Conv1D (stored ``(in, out)``)."""
    w = module.weight.detach()
    return w.T if is_hf_conv1d(module) else w


@dataclass(frozen=True)
class Refit:
    """One refit layer: relative calibration error ``Σ‖y − ŷ‖² / Σ‖y‖²`` of the cut layer
    (``before``) and of the refit one (``after``), and the kept input features."""

    layer: str
    features: int
    kept: int
    before: float
    after: float


def solve(A: torch.Tensor, gram: Gram, kept: torch.Tensor, bias: bool, damp: float):
    """The refit weights ``W'`` (``(out, len(kept) [+1 bias column])``) and the squared errors
    (total target energy, error of the cut weights, error of ``W'``), all float64.

    ``A``: the unpruned ``(out, F + 1)`` map ``[W, b]`` (``b = 0`` without a bias)."""
    F = gram.xx.shape[0] - 1
    idx = torch.cat([kept, torch.tensor([F])]) if bias else kept
    G = gram.xx[idx][:, idx]
    C = A @ gram.xx[:, idx]
    total = float(torch.einsum("of,fg,og->", A, gram.xx, A))
    if gram.cross is not None:
        C = C + gram.cross[:, idx]
        total += 2.0 * float((A * gram.cross).sum()) + gram.energy
    lam = damp * float(G.diagonal().mean()) if len(idx) else 0.0
    regular = G + lam * torch.eye(len(idx), dtype=G.dtype)
    try:
        W = torch.linalg.solve(regular, C.T).T            # G symmetric: C (G + λI)⁻¹
    except RuntimeError:                                 # singular without damping: least-norm solution
        W = C @ torch.linalg.pinv(regular, hermitian=True)

    def error(M):
        return max(total - 2.0 * float((M * C).sum()) + float(torch.einsum("of,fg,og->", M, G, M)), 0.0)
    return W, total, error(A[:, idx]), error(W)


@torch.no_grad()
def refit_layer(name: str, dense: nn.Module, thinned: nn.Module, gram: Gram, kept: torch.Tensor,
                damp: float) -> Refit:
    """Refit ``thinned`` (``dense`` with only the ``kept`` input features) in place from ``gram``,
    the statistics of ``dense``'s inputs on the calibration data."""
    W = weight_matrix(dense).double().cpu()
    bias = getattr(thinned, "bias", None) is not None
    b = dense.bias.detach().double().cpu() if bias else torch.zeros(W.shape[0], dtype=torch.float64)
    A = torch.cat([W, b[:, None]], dim=1)
    new, total, before, after = solve(A, gram, kept, bias, damp)
    weight = new[:, :len(kept)]
    target = thinned.weight
    target.copy_((weight.T if is_hf_conv1d(thinned) else weight).to(target.dtype))
    if bias:
        thinned.bias.copy_(new[:, -1].to(thinned.bias.dtype))
    scale = total if total > 0 else 1.0
    return Refit(name, W.shape[1], len(kept), before / scale, after / scale)
