"""Layer-wise Hessians for L-OBS (Dong et al. 2017; METHODS.md §1).

For a layer ``z = W x̃`` the layer-wise error ``E = (1/n) ‖Ẑ − Z‖²_F`` over n input
columns has, for every output row of W, the same Hessian

    H = (1/n) Σ_j x̃_j x̃_jᵀ,     x̃ = [x; 1] when the bias takes part (it is never
                                  pruned, but it absorbs part of the compensation).

For Conv2d every sliding-window patch is one column: ``unfold`` with the layer's
kernel, stride, padding and dilation gives columns of size ``in·kh·kw`` (ordered
like ``W.reshape(out, -1)``). Each batch's product ``XᵀX`` is a float32 matrix product
(the cost: a conv layer has batch × positions columns); the sums over batches are kept in
float64. The bias row and column (``Σx`` and n) are added without copying a column of ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.inputs import forward_batches
from prunelab.pruning.targets import Target


@dataclass
class LayerHessian:
    name: str
    xtx: torch.Tensor          # Σ x̃ x̃ᵀ, float64, (d, d)
    n: int                     # number of input columns summed
    with_bias: bool            # x̃ carries a trailing 1 for the bias
    seconds: float = 0.0

    @property
    def H(self) -> torch.Tensor:
        """``(1/n) Σ x̃ x̃ᵀ`` (undamped)."""
        return self.xtx / max(self.n, 1)


def check_target(target: Target, where: str = "L-OBS") -> None:
    module = target.module
    if target.param_name != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{where} prunes Linear and Conv2d weights; {target.name!r} is the "
                         f"'{target.param_name}' of a {target.kind}. Leave it out of 'layers'.")
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"{where} needs groups=1 convolutions; {target.name!r} has groups={module.groups}.")
        if module.padding_mode != "zeros":
            raise ValueError(f"{where} needs padding_mode='zeros'; {target.name!r} uses {module.padding_mode!r}.")


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows ``(n, in[·kh·kw])``, one per output position."""
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(x, module.kernel_size, dilation=module.dilation,
                                       padding=module.padding, stride=module.stride)  # (N, d, P)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def weight_matrix(target: Target) -> torch.Tensor:
    """W as ``(out, d)`` (a conv kernel flattened like ``unfold``'s columns)."""
    w = target.weight.detach()
    return w.reshape(w.shape[0], -1)


def collect(model: nn.Module, targets: Sequence[Target], batches: Iterable, *,
            with_bias: bool = True) -> dict[str, LayerHessian]:
    """Run ``batches`` through ``model`` (eval mode, no grad) and accumulate each target's
    input Hessian. One pass for all the given targets (pass one target at a time to bound
    memory by one layer)."""
    stats: dict[str, LayerHessian] = {}
    handles = []
    started = time.perf_counter()

    def hook_for(target: Target):
        bias = with_bias and getattr(target.module, "bias", None) is not None

        def hook(module, inputs, output):
            cols = input_columns(module, inputs[0].detach()).float()
            d = cols.shape[1]
            entry = stats.get(target.name)
            if entry is None:
                size = d + 1 if bias else d
                entry = stats[target.name] = LayerHessian(
                    target.name, torch.zeros(size, size, dtype=torch.float64), 0, bias)
            entry.xtx[:d, :d] += (cols.T @ cols).double()
            if bias:
                sums = cols.sum(dim=0, dtype=torch.float64)
                entry.xtx[:d, d] += sums
                entry.xtx[d, :d] += sums
                entry.xtx[d, d] += len(cols)
            entry.n += len(cols)
        return hook

    for target in targets:
        check_target(target)
        handles.append(target.module.register_forward_hook(hook_for(target)))
    try:
        forward_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - started
    for entry in stats.values():
        entry.seconds = seconds / max(len(stats), 1)
    missing = [t.name for t in targets if t.name not in stats]
    if missing:
        raise ValueError(f"L-OBS: the calibration forward never reached {', '.join(missing)}.")
    return stats


def prepare(h: LayerHessian, W: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped Hessian, the weight matrix with dead inputs zeroed, and the dead-input mask.

    A *dead* input (``H_jj = 0``: always zero on the calibration data) cannot change the
    output: its weights are zeroed (pruned first, at no cost) and ``H_jj`` set to 1 so H is
    invertible (as SparseGPT does). Damping adds ``λ · mean(diag H)`` to the diagonal."""
    H = h.H.clone()
    dead = torch.diagonal(H) == 0
    W = W.clone()
    W[:, dead] = 0
    H[dead, dead] = 1.0
    diag = torch.diagonal(H)
    diag += damping * diag.mean()
    return H, W, dead
