"""Least-squares refit of the layer that reads removed units (the structured L-OBS of Dong et al.
2017, applied to transformers; docs/methods.md "Structured transformer pruning").

After some of a layer's input features are removed (an attention head's columns of ``o_proj``, an
MLP's channels of ``down_proj``), its remaining weights are refit so that its output on the
calibration data is as close as possible to the unpruned layer's output. With ``x'`` the layer's
kept input features (of the unpruned model's input, or of the pruned model's: the caller chooses;
one column per token position, a constant 1 appended when the layer has a bias) and ``y`` the
unpruned layer's outputs on the unpruned model's inputs, the ridge-damped least-squares solution is

    W' = C (G + λI)⁻¹,   C = Σ y x'ᵀ,   G = Σ x' x'ᵀ,   λ = damp · mean(diag G).

The sums run over every token position of the calibration batches, in float64; ``Σ‖y‖²`` is kept
too, so that the squared error ``Σ‖y − W x'‖² = Σ‖y‖² − 2 tr(W Cᵀ) + tr(W G Wᵀ)`` of the cut
weights (``before``) and of the refit ones (``after``) follows without another pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from prunelab.units.groups import is_hf_conv1d


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(positions, features) in float64: every axis but the last is a position."""
    return x.detach().reshape(-1, x.shape[-1]).double()


@dataclass
class Normal:
    """The sums of the normal equations of one layer: ``xx = Σ x' x'ᵀ`` (a constant feature
    appended last when ``bias``), ``yx = Σ y x'ᵀ``, ``yy = Σ‖y‖²``."""

    bias: bool
    xx: torch.Tensor | None = None
    yx: torch.Tensor | None = None
    yy: float = 0.0
    count: int = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Token positions of one batch: inputs ``x`` (…, K) and targets ``y`` (…, out)."""
        x, y = tokens(x), tokens(y)
        if len(x) != len(y):
            raise ValueError(f"the refit inputs and targets differ in positions ({len(x)} vs {len(y)}).")
        if self.bias:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        xx, yx = (x.T @ x).cpu(), (y.T @ x).cpu()
        self.xx = xx if self.xx is None else self.xx + xx
        self.yx = yx if self.yx is None else self.yx + yx
        self.yy += float(y.pow(2).sum())
        self.count += len(x)

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``xx`` and ``yx``, which the first :meth:`add` sets (the methods below need them)."""
        assert self.xx is not None and self.yx is not None, "no positions added to the normal equations"
        return self.xx, self.yx

    def merged(self, other: Normal) -> Normal:
        """The sums over both sets of positions."""
        if other.count == 0:
            return self
        (xx, yx), (other_xx, other_yx) = self._sums(), other._sums()
        return Normal(self.bias, xx + other_xx, yx + other_yx, self.yy + other.yy, self.count + other.count)

    def error(self, W: torch.Tensor) -> float:
        """``Σ‖y − W x'‖²`` (``W``: ``(out, K [+1])``, float64)."""
        xx, yx = self._sums()
        return max(self.yy - 2.0 * float((W * yx).sum()) + float(torch.einsum("of,fg,og->", W, xx, W)), 0.0)

    def solve(self, damp: float) -> torch.Tensor:
        """``W' = C (G + λI)⁻¹`` (the least-norm solution where ``G + λI`` is singular)."""
        xx, yx = self._sums()
        lam = damp * float(xx.diagonal().mean())
        regular = xx + lam * torch.eye(len(xx), dtype=xx.dtype)
        try:
            return torch.linalg.solve(regular, yx.T).T  # G symmetric
        except RuntimeError:
            return yx @ torch.linalg.pinv(regular, hermitian=True)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a Linear or a Hugging Face Conv1D (stored ``(in, out)``)."""
    w = cast(torch.Tensor, module.weight).detach()
    return w.T if is_hf_conv1d(module) else w


def augmented(module: nn.Module) -> torch.Tensor:
    """``[W, b]`` (``W`` alone without a bias): a float64 copy on the CPU."""
    W = weight_matrix(module).double().cpu().clone()
    if getattr(module, "bias", None) is None:
        return W
    return torch.cat([W, cast(torch.Tensor, module.bias).detach().double().cpu()[:, None]], dim=1)


@dataclass(frozen=True)
class Refit:
    """One refit layer: relative error ``Σ‖y − ŷ‖² / Σ‖y‖²`` on the calibration data with the cut
    weights (``before``) and the refit ones (``after``), and on the held-out calibration batches
    (``held_out_before``/``held_out_after``; None without them). ``applied``: False when the refit
    did not lower the held-out error and the cut weights were kept."""

    layer: str
    features: int
    kept: int
    before: float
    after: float
    held_out_before: float | None
    held_out_after: float | None
    applied: bool


@torch.no_grad()
def refit_layer(
    name: str, module: nn.Module, fit: Normal, damp: float, features: int, held_out: Normal | None = None
) -> Refit:
    """Replace ``module``'s weight (and bias) by the least-squares solution, in place. With
    ``held_out`` sums, the solution of ``fit`` alone must lower the error on them; then the
    weights are solved from both, else the module is left as it is."""
    current = augmented(module)
    check = held_out if held_out is not None and held_out.count > 0 else None  # held-out sums, if any
    held = (check.error(current), check.error(fit.solve(damp))) if check is not None else None
    applied = held is None or held[1] < held[0]
    normal = fit.merged(check) if check is not None else fit
    new = normal.solve(damp) if applied else current
    if applied:
        kept = weight_matrix(module).shape[1]
        weight = new[:, :kept]
        old_weight = cast(torch.Tensor, module.weight)
        old_weight.copy_((weight.T if is_hf_conv1d(module) else weight).to(old_weight.dtype))
        if normal.bias:
            old_bias = cast(torch.Tensor, module.bias)
            old_bias.copy_(new[:, -1].to(old_bias.dtype))
    scale = normal.yy if normal.yy > 0 else 1.0
    held_scale = check.yy if check is not None and check.yy > 0 else 1.0
    return Refit(
        name,
        features,
        weight_matrix(module).shape[1],
        normal.error(current) / scale,
        normal.error(new) / scale,
        None if held is None else held[0] / held_scale,
        None if held is None else held[1] / held_scale,
        applied,
    )
