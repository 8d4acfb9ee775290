"""Unit groups of conv nets that are not chains (branches, residual additions, depthwise convs),
found with Torch-Pruning's dependency graph (Fang et al., CVPR 2023; `torch-pruning` needs only
torch and numpy).

Torch-Pruning traces the model once and, for each Conv/Linear layer, finds every tensor coupled
with its output channels: the other layers adding into the same residual stream, their
BatchNorms, a depthwise conv (whose input and output channels are one), and the layers that read
the channels. Each such set becomes one :class:`~prunelab.units.groups.UnitGroup` — scored,
removed and thinned as one, so ``fraction=0.5`` removes half of a residual stream's channels, not
the union of every layer's own choice. The layers that read the group are its *points*; a point
without a bias can absorb mean replacement in the running mean of the BatchNorm right after it.
Thinning cuts the same tensors (prunelab's own code, :func:`~prunelab.units.groups.thin_groups`).
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab.inputs import Batch
from prunelab.units.groups import Axis, Point, UnitGroup

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _tp():
    """Torch-Pruning (a dependency), imported on first use: its import takes seconds."""
    import torch_pruning

    return torch_pruning


def _index(idxs, n_units: int, where: str) -> torch.Tensor:
    """(n_units, k): the elements of a member that belong to each unit (channel of the root layer),
    from Torch-Pruning's (index, root index) pairs."""
    plain = [int(getattr(i, "idx", i)) for i in idxs]
    if len(plain) % n_units or len(set(plain)) != len(plain):
        raise ValueError(f"unit removal cannot map the {n_units} channels of a group onto the inputs of {where!r}.")
    return torch.tensor(plain, dtype=torch.long).view(n_units, -1)  # root order; a flatten: k per channel


def _is_depthwise(module) -> bool:
    return isinstance(module, CONVS) and module.groups > 1 and module.groups == module.in_channels


def build(model: nn.Module, batch: Batch):
    tp = _tp()
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        return tp, tp.DependencyGraph().build_dependency(
            model, example_inputs=batch.inputs, forward_fn=lambda m, _: batch.call(m), verbose=False
        )


def find(model: nn.Module, batch: Batch) -> tuple[list[UnitGroup], dict[str, str]]:
    """The unit groups of a conv net, and the groups refused with the reason."""
    tp, graph = build(model, batch)
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    groups, refused = [], {}
    for tp_group in graph.get_all_groups(root_module_types=(*CONVS, nn.Linear)):
        producers = [
            d.target.module
            for d, _ in tp_group
            if graph.is_out_channel_pruning_fn(d.handler) and isinstance(d.target.module, (*CONVS, nn.Linear))
        ]
        if not producers or any(not graph.module2node[m].outputs for m in producers):
            continue  # the model's outputs are not units
        producers = sorted(set(producers), key=order.__getitem__)
        name, first = names[producers[0]], producers[0]
        n_units = first.weight.shape[0]
        rooted = graph.get_pruning_group(
            first, graph.get_pruner_of_module(first).prune_out_channels, idxs=list(range(n_units))
        )  # indices in the first producer's order
        deps = [(d.target.module, d.handler, idxs) for d, idxs in rooted if d.target.module in names]
        group = UnitGroup(
            name,
            "dense" if isinstance(producers[0], nn.Linear) else "conv",
            n_units,
            zero=[],
            points=[],
            rows=[],
            module=producers[0],
        )
        reason = _fill(group, deps, producers, graph, names)
        if reason:
            refused[name] = reason
        else:
            group.members = sorted({names[m] for m, _, _ in deps}, key=lambda n: order[model.get_submodule(n)])
            groups.append(group)
    return groups, refused


def _fill(group: UnitGroup, deps, producers, graph, names) -> str | None:
    """Fill the group's tensors from Torch-Pruning's dependencies; a reason when it is refused."""
    seen = set()
    for module, _handler, idxs in deps:
        if module in seen:
            continue
        seen.add(module)
        index = _index(idxs, group.n_units, names[module])
        if module in producers:
            if isinstance(module, CONVS) and module.groups > 1 and not _is_depthwise(module):
                return f"{names[module]!r} is a grouped convolution (groups={module.groups}), not supported"
            rows = Axis(module, "weight", 0, index)
            group.rows.append(rows)
            group.zero += [rows, Axis(module, "bias", 0, index)]
            group.cuts += [rows, Axis(module, "bias", 0, index)]
        elif isinstance(module, NORMS):
            params = ["weight", "bias"] if module.affine else ["running_mean"]
            group.zero += [Axis(module, p, 0, index) for p in params]
            group.cuts += [Axis(module, p, 0, index) for p in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(module, (*CONVS, nn.Linear)):
            dim = 1
            group.points.append(
                Point(module, names[module], dim if isinstance(module, CONVS) else -1, index, _absorber(module, graph))
            )
            group.cuts.append(Axis(module, "weight", dim, index))
        else:
            return (
                f"its channels pass through {names[module]!r} ({type(module).__name__}), which unit removal "
                f"does not cut (a normalisation over channels, an embedding or a recurrent layer)"
            )
    if not group.points:
        return "no layer reads its channels"
    return None


def _absorber(module: nn.Module, graph) -> nn.Module | None:
    """The BatchNorm right after a bias-free ``module`` (it can absorb a folded constant)."""
    if getattr(module, "bias", None) is not None:
        return None
    outputs = graph.module2node[module].outputs
    if len(outputs) == 1 and isinstance(outputs[0].module, NORMS) and outputs[0].module.track_running_stats:
        return outputs[0].module
    return None
