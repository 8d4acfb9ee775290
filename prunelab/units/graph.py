"""Unit removal in models that are not chains (branches, residual additions,
concatenation), with Torch-Pruning's dependency graph (Fang et al., CVPR 2023;
`torch-pruning` needs only torch and numpy).

Removing output channels of one layer may force the same channels out of coupled layers
(the other branch of a residual addition); Torch-Pruning finds that *group*. Here:

* **masked removal** zeroes every producer of the group's channels (Conv/Linear rows and
  biases, BatchNorm scale and shift), so the channels carry 0 to every consumer;
* **mean replacement** folds, into each consumer's bias, the mean of that consumer's input
  channels over the calibration data (measured on the unpruned model), ``b ← b + W[:, u]·m_u``
  — the mean where the consumer sees the channel, since in a graph the channel may pass
  through several ops on different paths;
* **thinning** lets Torch-Pruning remove the group from a copy of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from prunelab.inputs import forward_batches

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _tp():
    try:
        import torch_pruning
    except ImportError:
        raise ValueError("unit removal in models that are not plain chains needs Torch-Pruning: "
                         "pip install torch-pruning (it needs only torch and numpy).") from None
    return torch_pruning


def _out_handler(tp, module):
    return tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels


def groups(model: nn.Module, example: torch.Tensor, plan: dict[str, torch.Tensor]):
    """Torch-Pruning groups for ``plan``. Layers whose output channels are coupled (the two
    branches of a residual addition share one channel space) get one group with the union of
    their indices — pruned one after the other, the second group's indices would be stale."""
    tp = _tp()
    with torch.enable_grad():            # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    modules = dict(model.named_modules())
    merged: list[tuple[nn.Module, set[int], set[nn.Module]]] = []
    for name, idx in plan.items():
        if not len(idx):
            continue
        module = modules[name]
        group = graph.get_pruning_group(module, _out_handler(tp, module), idxs=[int(i) for i in idx])
        producers = {dep.target.module for dep, _ in group
                     if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels)}
        for i, (root, indices, members) in enumerate(merged):
            if members & producers:
                merged[i] = (root, indices | {int(j) for j in idx}, members | producers)
                break
        else:
            merged.append((module, {int(j) for j in idx}, producers))
    out = [graph.get_pruning_group(root, _out_handler(tp, root), idxs=sorted(indices))
           for root, indices, _ in merged]
    return tp, out


def consumer_input_means(model: nn.Module, batches: Iterable) -> dict[nn.Module, torch.Tensor]:
    """Mean input feature (Linear) or channel (Conv2d) of every parametrised layer."""
    sums, counts, handles = {}, {}, []

    def hook(module, inputs):
        x = inputs[0].detach().double()
        if isinstance(module, nn.Conv2d):
            s, n = x.sum(dim=(0, 2, 3)), x.shape[0] * x.shape[2] * x.shape[3]
        else:
            x = x.reshape(-1, x.shape[-1])
            s, n = x.sum(dim=0), x.shape[0]
        sums[module] = sums.get(module, 0) + s
        counts[module] = counts.get(module, 0) + n

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_pre_hook(hook))
    try:
        forward_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {m: sums[m] / counts[m] for m in sums}


@torch.no_grad()
def mask_units(model: nn.Module, example: torch.Tensor, plan: dict[str, torch.Tensor],
               input_means: dict | None = None) -> None:
    """Masked removal (and, with ``input_means``, mean replacement) of ``plan``'s groups, in
    place: every fold first, with the weights before any zeroing, then every zeroing."""
    tp, found = groups(model, example, plan)
    deps = [(dep.target.module, dep.handler, torch.tensor(sorted({int(i) for i in idxs}), dtype=torch.long))
            for group in found for dep, idxs in group]
    deps = [(module, handler, idx) for module, handler, idx in deps if len(idx)]
    if input_means is not None:
        for module, handler, idx in deps:
            if handler in (tp.prune_conv_in_channels, tp.prune_linear_in_channels):
                if module.bias is None:
                    raise ValueError(f"mean replacement folds into the bias of a {type(module).__name__} that "
                                     f"has none; prune without mean replacement.")
                W = module.weight.double()
                contribution = (W[:, idx].sum(dim=(2, 3)) if W.dim() == 4 else W[:, idx]) @ input_means[module][idx]
                module.bias += contribution.to(module.bias.dtype)
    for module, handler, idx in deps:
        if handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
            module.weight[idx] = 0.0
            if module.bias is not None:
                module.bias[idx] = 0.0
        elif isinstance(module, NORMS) and module.affine:
            module.weight[idx] = 0.0
            module.bias[idx] = 0.0


@torch.no_grad()
def thin(model: nn.Module, example: torch.Tensor, plan: dict[str, torch.Tensor]) -> nn.Module:
    thinned = copy.deepcopy(model)
    was_training = thinned.training
    thinned.eval()
    _, found = groups(thinned, example, plan)
    for group in found:
        group.prune()
    thinned.train(was_training)
    return thinned
