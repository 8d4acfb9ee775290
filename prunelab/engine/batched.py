"""R independent models of one architecture, trained as one batched computation.

    from prunelab.engine import BatchedModels, fit_batched
    members = [prunelab.build_model("mlp", dataset=ds, hidden=[100], seed=s) for s in range(8)]
    batch = BatchedModels(members)
    fit_batched(batch, ds, seeds=range(8), epochs=3, lr=[0.1] * 4 + [0.05] * 4)
    models = batch.split()             # ordinary nn.Modules again, one per member

Every parameter and buffer is stacked along a new leading member axis (R, ...), and the
forward pass is ``torch.func.vmap`` over that axis of a stateless copy of the architecture
(``functional_call``), so R small matrix products become one batched product. Members
never mix: the loss is the sum of the members' own mean losses, so each member's gradient is
exactly the gradient of its own loss; the optimiser update is element-wise with a per-member
learning rate; masks are per member.

Each member sees its own data order: member r shuffles with ``torch.Generator().manual_seed(
seeds[r])`` every epoch, exactly as :func:`prunelab.fit` does with ``seed=seeds[r]``, so a
member trained here follows the same trajectory as the same model trained alone (up to the
rounding of a batched product against a single one).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from numbers import Integral, Real
from typing import cast

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from prunelab._validation import (
    BATCH_SIZE,
    DATA,
    EPOCHS,
    MAX_SEED,
    MAX_UNITS,
    STEP,
    Interval,
    Options,
    Types,
    check_choice,
    check_number,
    validate_params,
)
from prunelab.training import TrainingDiverged, as_xy

OPTIMIZERS = ("sgd", "adam")


def _signature(model: nn.Module) -> list[tuple[str, tuple, torch.dtype]]:
    return [(name, tuple(t.shape), t.dtype) for name, t in [*model.named_parameters(), *model.named_buffers()]]


class BatchedModels:
    """R models of the same architecture, stacked along a leading member axis."""

    @validate_params({"models": [Types(list, tuple)]})
    def __init__(self, models: Sequence[nn.Module]):
        models = list(models)
        if not models:
            raise ValueError("BatchedModels needs at least one model; got an empty sequence.")
        for i, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise TypeError(
                    f"the 'models' parameter of BatchedModels must hold nn.Modules. "
                    f"Got {type(model).__name__} at position {i} instead."
                )
        first = _signature(models[0])
        for i, model in enumerate(models[1:], start=1):
            if type(model) is not type(models[0]) or _signature(model) != first:
                raise ValueError(
                    f"BatchedModels needs models of one architecture: model {i} "
                    f"({type(model).__name__}) differs from model 0 ({type(models[0]).__name__}) "
                    f"in its class or in the names, shapes or dtypes of its tensors."
                )
        self.members = models
        self.size = len(models)
        params, buffers = stack_module_state(models)
        self.params: dict[str, torch.Tensor] = params
        self.buffers: dict[str, torch.Tensor] = buffers
        self._skeleton = copy.deepcopy(models[0]).to("meta")
        self.masks: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of shape (R, B, ...) → outputs (R, B, ...): member r runs on ``x[r]``."""
        if x.shape[0] != self.size:
            raise ValueError(
                f"BatchedModels.forward expects a leading member axis of {self.size}; "
                f"got an input of shape {tuple(x.shape)}."
            )

        def one(params, buffers, xi):
            return functional_call(self._skeleton, (params, buffers), (xi,))

        return vmap(one, randomness="different")(self.params, self.buffers, x)

    __call__ = forward

    def train(self, mode: bool = True) -> BatchedModels:
        self._skeleton.train(mode)
        return self

    def eval(self) -> BatchedModels:
        return self.train(False)

    # ------------------------------------------------------------------- masks
    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Per-member masks ``{parameter name: (R, *shape) tensor of 0/1}``; the weights are
        masked now and after every optimiser step."""
        for name, mask in masks.items():
            if name not in self.params:
                raise ValueError(f"set_masks: no parameter {name!r}; parameters: {', '.join(self.params)}.")
            if tuple(mask.shape) != tuple(self.params[name].shape):
                raise ValueError(
                    f"set_masks: the mask of {name!r} has shape {tuple(mask.shape)}, the stacked "
                    f"parameter {tuple(self.params[name].shape)}."
                )
            self.masks[name] = mask.to(dtype=self.params[name].dtype, device=self.params[name].device)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for name, mask in self.masks.items():
            self.params[name].mul_(mask)

    # ------------------------------------------------------------------- split
    @torch.no_grad()
    def member(self, r: int) -> nn.Module:
        """A new ordinary ``nn.Module`` with member ``r``'s current weights."""
        r = check_number("r", r, where="BatchedModels.member", low=0, high=self.size - 1, integer=True)
        model = copy.deepcopy(self.members[r])
        state = {name: t[r].detach().clone() for name, t in {**self.params, **self.buffers}.items()}
        model.load_state_dict(state)
        return model

    def split(self) -> list[nn.Module]:
        """Every member as an ordinary ``nn.Module`` (copies; the batch is unchanged)."""
        return [self.member(r) for r in range(self.size)]

    @torch.no_grad()
    def load_member(self, r: int, model: nn.Module) -> None:
        """Write ``model``'s weights into member ``r`` (e.g. after pruning it alone)."""
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            # every parameter and buffer name of a member is in params or buffers
            target = cast(torch.Tensor, self.params.get(name, self.buffers.get(name)))
            target[r].copy_(tensor.detach())

    @torch.no_grad()
    def store_member(self, r: int) -> nn.Module:
        """Copy member ``r``'s current weights into its own module ``members[r]`` (in place, so
        anything holding that module's tensors, e.g. a Pruner, sees them) and return it."""
        module = self.members[r]
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            tensor.copy_(cast(torch.Tensor, self.params.get(name, self.buffers.get(name)))[r])
        return module

    def rows(self, rows: slice) -> BatchedModels:
        """The members ``rows`` as a BatchedModels sharing this one's tensors (views: training
        it trains them here). Masks it creates come back with :meth:`take_masks`."""
        part = object.__new__(BatchedModels)
        part.members = self.members[rows]
        part.size = len(part.members)
        # leaves of their own (autograd then fills their .grad), on this batch's storage
        part.params = {name: t[rows].detach().requires_grad_(t.requires_grad) for name, t in self.params.items()}
        part.buffers = {name: t[rows] for name, t in self.buffers.items()}
        part._skeleton = self._skeleton
        part.masks = {name: t[rows] for name, t in self.masks.items()}
        return part

    def take_masks(self, part: BatchedModels, rows: slice) -> None:
        """Copy the masks of ``part`` (made by :meth:`rows`) into members ``rows``."""
        for name, mask in part.masks.items():
            if name not in self.masks:
                self.masks[name] = torch.ones_like(self.params[name])
            if self.masks[name][rows].data_ptr() != mask.data_ptr():
                self.masks[name][rows] = mask

    def mask_row(self, r: int, name: str, keep: torch.Tensor | None) -> None:
        """Set member ``r``'s mask of parameter ``name`` (None: keep everything)."""
        if keep is None and name not in self.masks:
            return
        if name not in self.masks:
            self.masks[name] = torch.ones_like(self.params[name])
        self.masks[name][r] = 1.0 if keep is None else keep.to(self.masks[name].dtype)


def member_sparsity(batch: BatchedModels, r: int, names: Sequence[str]) -> float:
    """Fraction of exact zeros of member ``r`` over the parameters ``names``."""
    total = sum(batch.params[n][r].numel() for n in names)
    zeros = sum(int((batch.params[n][r] == 0).sum()) for n in names)
    return zeros / total


class _Optimizer:
    """SGD (momentum, as torch.optim.SGD) or Adam (as torch.optim.Adam) over stacked
    parameters with one learning rate per member; element-wise, so members stay apart."""

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        name: str,
        lr: torch.Tensor,
        momentum: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.params, self.name, self.momentum, self.betas, self.eps = params, name, momentum, betas, eps
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0
        self.lr = {n: lr.view(-1, *([1] * (p.dim() - 1))).to(p) for n, p in params.items()}

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            lr = self.lr[name]
            state = self.state.setdefault(name, {})
            # one pass over memory per operation where torch allows it: these updates, not the
            # products, bound a step of a small model (see docs/engine.md)
            if self.name == "sgd":
                if self.momentum:
                    buf = state.get("momentum")
                    if buf is None:
                        buf = state["momentum"] = g.clone()
                    else:
                        torch.add(g, buf, alpha=self.momentum, out=buf)  # buf ← g + μ·buf
                    g = buf
                p.addcmul_(lr, g, value=-1.0)  # p ← p − lr_r·g
            else:
                b1, b2 = self.betas
                m = state.setdefault("m", torch.zeros_like(p))
                v = state.setdefault("v", torch.zeros_like(p))
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                c1 = 1 - b1**self.steps
                c2 = 1 - b2**self.steps
                denom = v.sqrt().div_(math.sqrt(c2)).add_(self.eps)
                p.addcdiv_(m * (lr / c1), denom, value=-1.0)

    def momentum_buffers(self) -> dict[str, torch.Tensor]:
        """SGD's momentum buffers (zeros where there is none yet), for :meth:`descend`: the
        hand-written MLP path accumulates its gradients straight into them."""
        return {
            name: self.state.setdefault(name, {}).setdefault("momentum", torch.zeros_like(p))
            for name, p in self.params.items()
        }

    @torch.no_grad()
    def descend(self) -> None:
        """``p ← p − lr_r·buf`` for SGD with momentum whose buffers already hold ``g + μ·buf``
        (one pass over memory fewer than :meth:`step`; the result is the same)."""
        self.steps += 1
        for name, p in self.params.items():
            p.addcmul_(self.lr[name], self.state[name]["momentum"], value=-1.0)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def mask_state(self, masks: dict[str, torch.Tensor]) -> None:
        """Clear the optimiser state of masked entries (as the single-model Pruner does)."""
        for name, mask in masks.items():
            for buf in self.state.get(name, {}).values():
                buf.mul_(mask)


def _per_member(value, size: int, param: str, positive: bool = True) -> torch.Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)] * size
    else:
        values = [float(v) for v in value]
        if len(values) != size:
            raise ValueError(
                f"the '{param}' parameter of fit_batched needs one value per member ({size}); got {len(values)}."
            )
    for v in values:
        check_number(param, v, where="fit_batched", low=0.0, closed="neither" if positive else "both")
    return torch.tensor(values, dtype=torch.float64)


REGULARIZERS = ("l1", "l2")


def mlp_plan(model: nn.Module) -> list[tuple[str, str | None]] | None:
    """``[(weight name, bias name), ...]`` of the Linear layers when ``model`` is a plain
    ``nn.Sequential`` of an optional Flatten, then Linear layers with a ReLU after each but the
    last: the models the engine trains with its own batched products instead of vmap + autograd
    (no transposed copies; about twice as fast). None for any other model."""
    if not isinstance(model, nn.Sequential):
        return None
    children = list(model.named_children())
    if children and isinstance(children[0][1], nn.Flatten):
        if (children[0][1].start_dim, children[0][1].end_dim) != (1, -1):
            return None
        children = children[1:]
    plan: list[tuple[str, str | None]] = []
    expect_linear = True
    for name, module in children:
        if expect_linear and isinstance(module, nn.Linear):
            plan.append((f"{name}.weight", f"{name}.bias" if module.bias is not None else None))
            expect_linear = False
        elif not expect_linear and type(module) is nn.ReLU:
            expect_linear = True
        else:
            return None
    return plan if plan and not expect_linear else None


#: Accumulate the weight gradients of the hand-written MLP path into SGD's momentum buffers
#: (``False`` only to measure the gain, as docs/performance.md describes).
_FUSE_MOMENTUM = True


def _mlp_step(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    plan,
    x: torch.Tensor,
    y: torch.Tensor,
    beta: float = 0.0,
):
    """Per-member mean cross-entropy and outputs of a batched ReLU MLP, with the gradients
    written into ``grads`` (buffers kept from step to step, so no large tensor is allocated):
    the forward and backward by hand, three batched products per layer. With ``beta`` the
    gradients are added to ``beta·grads`` instead (SGD's momentum ``buf ← g + μ·buf``, done by
    the weight-gradient product itself)."""
    R, B = y.shape
    h = x.flatten(2)
    inputs, pre = [], []
    with torch.no_grad():
        for k, (w_name, b_name) in enumerate(plan):
            W = params[w_name]
            inputs.append(h)
            z = (
                torch.bmm(h, W.transpose(1, 2))
                if b_name is None
                else torch.baddbmm(params[b_name].unsqueeze(1), h, W.transpose(1, 2))
            )
            pre.append(z)
            h = z.clamp_min(0) if k < len(plan) - 1 else z
        logp = torch.log_softmax(h, dim=-1)
        losses = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(dim=1)  # (R,)
        g = logp.exp()
        g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(g[..., :1], -1.0))
        g.div_(B)  # ∂(mean loss)/∂logits
        for k in range(len(plan) - 1, -1, -1):
            w_name, b_name = plan[k]
            if beta:
                grads[w_name].baddbmm_(g.transpose(1, 2), inputs[k], beta=beta)
                if b_name is not None:
                    grads[b_name].mul_(beta).add_(g.sum(dim=1))
            else:
                torch.bmm(g.transpose(1, 2), inputs[k], out=grads[w_name])
                if b_name is not None:
                    torch.sum(g, dim=1, out=grads[b_name])
            if k:
                g = torch.bmm(g, params[w_name]).mul_(pre[k - 1] > 0)
    return losses, h


def _check_pruners(batch: BatchedModels, pruners) -> list:
    from prunelab.pruning import Pruner

    pruners = list(pruners)
    if len(pruners) != batch.size:
        raise ValueError(
            f"the 'pruners' parameter of fit_batched needs one Pruner (or None) per member "
            f"({batch.size}); got {len(pruners)}."
        )
    for r, pruner in enumerate(pruners):
        if pruner is None:
            continue
        if not isinstance(pruner, Pruner):
            raise TypeError(
                f"the 'pruners' parameter of fit_batched must hold Pruners or None. "
                f"Got {type(pruner).__name__} for member {r} instead."
            )
        if pruner.model is not batch.members[r]:
            raise ValueError(f"the Pruner of member {r} prunes another model: build it on batch.members[{r}].")
        if pruner.criterion.needs_gradients and pruner.calibration is None:
            raise ValueError(
                f"the Pruner of member {r} uses criterion {pruner.criterion.name!r}, which reads "
                f"gradients; the batched engine does not record training gradients per member, so "
                f"give that Pruner calibration=(x, y) data to score with."
            )
        if pruner._rewind_step is not None:
            raise ValueError(
                f"the Pruner of member {r} rewinds weights (lottery ticket); the batched engine "
                f"does not support rewinding yet: train that member with prunelab.fit."
            )
    return pruners


def _after_prune(batch: BatchedModels, r: int, pruner, opt: _Optimizer) -> None:
    """Member ``r``'s pruner has just pruned its module: bring weights and masks back."""
    module = batch.members[r]
    batch.load_member(r, module)
    names = {id(p): n for n, p in module.named_parameters()}
    for target in pruner.targets:
        for tensor in (target.weight, target.bias):
            if tensor is not None:
                keep = pruner.masks.get(tensor)
                batch.mask_row(r, names[id(tensor)], None if keep is None else keep.bool())
    opt.mask_state(batch.masks)


@validate_params(
    {
        "batch": [Types(BatchedModels)],
        "data": [DATA],
        "seeds": [Types(list, tuple)],
        "epochs": [EPOCHS],
        "batch_size": [BATCH_SIZE],
        "optimizer": [Options(OPTIMIZERS)],
        "momentum": [Interval(Real, 0, 1, closed="left")],
        "regularizer": [Options(REGULARIZERS), None],
        "max_steps": [STEP, None],
        "engine_path": [Options({"auto", "vmap"})],
        "wave": [Interval(Integral, 1, MAX_UNITS), None],
        "validation": [DATA, None],
    }
)
def fit_batched(
    batch: BatchedModels,
    data,
    *,
    seeds: Sequence[int],
    epochs: int = 1,
    batch_size: int = 64,
    lr: float | Sequence[float] = 0.01,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    regularizer: str | None = None,
    reg_strength: float | Sequence[float] | None = None,
    pruners: Sequence | None = None,
    max_steps: int | None = None,
    engine_path: str = "auto",
    wave: int | None = None,
    validation=None,
) -> list[list[dict]]:
    """Train every member of ``batch`` on ``data`` (``(x, y)`` or a Dataset's train split).

    Member r shuffles with ``seeds[r]`` and learns at ``lr[r]`` (one float: the same for all).
    ``regularizer`` (``"l1"`` or ``"l2"``, as in :func:`prunelab.fit`) penalises each member's
    prunable weights with its own ``reg_strength[r]``. ``pruners[r]`` (a
    :class:`~prunelab.Pruner` built on ``batch.members[r]``, or None) follows its schedule on
    member r: when one of its events falls due, the member's weights are copied into its module,
    the Pruner prunes it there with any criterion, granularity and scope, and the weights
    (compensated ones too, for L-OBS) and masks come back into the batch.

    ReLU MLPs (:func:`mlp_plan`) train through hand-written batched products; every other model,
    or ``engine_path="vmap"``, through ``torch.func.vmap`` and autograd.

    On a CPU the members train in waves of ``wave`` members, one wave after the other (each
    wave's whole training in one batched computation): a step touches every member's weights,
    gradients, optimiser state and mask, and once these outgrow the last-level cache each step
    waits on main memory. ``wave=None`` takes as many members as fit the cache
    (:func:`~prunelab.engine.memory.cache_members`), in waves of even size; on a GPU all
    members train at once.

    ``validation`` (an ``(x, y)`` pair, or a Dataset: its validation split): after every epoch
    each member is evaluated on it in eval mode, as :func:`prunelab.fit` evaluates a Dataset's
    validation split.

    Returns one per-epoch history per member (``loss``, ``train_accuracy``, ``sparsity`` with a
    pruner, and ``val_loss`` and ``val_accuracy`` with ``validation``). A member whose loss becomes NaN or infinite raises
    :class:`TrainingDiverged` naming it."""
    where = "fit_batched"
    x, y = as_xy(data, "data", where)
    val = None
    if validation is not None:
        if hasattr(validation, "x_val"):  # a Dataset: its validation split, not its train split
            if validation.x_val is None:
                raise ValueError(
                    f"the 'validation' parameter of {where} is a Dataset without a validation split; "
                    "load it with a 'validation' size or pass an (x, y) pair."
                )
            validation = (validation.x_val, validation.y_val)
        val = as_xy(validation, "validation", where)
    seeds = [check_number("seeds", s, where=where, low=0, high=MAX_SEED, integer=True) for s in seeds]
    if len(seeds) != batch.size:
        raise ValueError(
            f"the 'seeds' parameter of {where} needs one seed per member ({batch.size}); got {len(seeds)}."
        )
    epochs, batch_size, momentum = int(epochs), int(batch_size), float(momentum)
    wave = None if wave is None else int(wave)
    lrs = _per_member(lr, batch.size, "lr")
    reg_names, strengths = [], None
    if regularizer is not None:
        from prunelab.pruning.targets import resolve_targets

        regularizer = check_choice("regularizer", regularizer, REGULARIZERS, where=where)
        if reg_strength is None:
            raise ValueError(f"the 'reg_strength' parameter of {where} is needed with regularizer {regularizer!r}.")
        strengths = _per_member(reg_strength, batch.size, "reg_strength", positive=False).float()
        reg_names = [t.name for t in resolve_targets(batch.members[0], where=where)]
    pruners = _check_pruners(batch, pruners) if pruners is not None else [None] * batch.size
    plan = mlp_plan(batch.members[0]) if engine_path == "auto" else None
    device = next(iter(batch.params.values())).device
    x, y = x.to(device), y.to(device)  # the data goes where the members are
    if val is not None:
        val = (val[0].to(device), val[1].to(device))
    if wave is None:
        if device.type == "cuda":
            wave = batch.size
        else:
            from prunelab.engine.memory import cache_members

            wave = cache_members(batch.members[0], tuple(x.shape[1:]), batch_size)
    waves = math.ceil(batch.size / wave)
    wave = math.ceil(batch.size / waves)  # even waves: 8 members in 7 + 1 would be 2 full steps
    histories: list[list[dict]] = []
    for first in range(0, batch.size, wave):
        rows = slice(first, min(first + wave, batch.size))
        part = batch if rows == slice(0, batch.size) else batch.rows(rows)
        try:
            histories += _train(
                part,
                x,
                y,
                seeds=seeds[rows],
                epochs=epochs,
                batch_size=batch_size,
                lrs=lrs[rows],
                optimizer=optimizer,
                momentum=momentum,
                regularizer=regularizer,
                strengths=None if strengths is None else strengths[rows],
                reg_names=reg_names,
                pruners=pruners[rows],
                max_steps=max_steps,
                plan=plan,
                first=first,
                val=val,
            )
        finally:
            if part is not batch:
                batch.take_masks(part, rows)
    return histories


def _train(
    batch: BatchedModels,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seeds,
    epochs,
    batch_size,
    lrs,
    optimizer,
    momentum,
    regularizer,
    strengths,
    reg_names,
    pruners,
    max_steps,
    plan,
    first,
    val=None,
) -> list[list[dict]]:
    """fit_batched on one wave of members (checked arguments); ``first`` numbers its members in
    messages."""
    opt = _Optimizer(batch.params, optimizer, lrs, momentum)
    for r, pruner in enumerate(pruners):
        if pruner is None:
            continue
        if pruner.event_due(0):  # events due before the first step (one-shot at 0)
            batch.store_member(r)
            pruner.update()
        if pruner.history:  # pruned here or before: take its weights and masks
            _after_prune(batch, r, pruner, opt)
    batch.apply_masks()
    opt.mask_state(batch.masks)
    shuffles = [torch.Generator().manual_seed(s) for s in seeds]
    n, R = len(x), batch.size
    # SGD with momentum on the hand-written path: the gradient product accumulates into the
    # momentum buffers (beta = μ), so a step makes one pass over the weights fewer
    fused = _FUSE_MOMENTUM and plan is not None and opt.name == "sgd" and opt.momentum > 0
    if plan is not None:
        grads = opt.momentum_buffers() if fused else {name: torch.zeros_like(p) for name, p in batch.params.items()}
        for name, g in grads.items():
            batch.params[name].grad = g
    total = epochs * math.ceil(n / batch_size) if max_steps is None else max_steps
    histories: list[list[dict]] = [[] for _ in range(R)]
    step = 0
    batch.train()
    for epoch in range(epochs):
        started = time.perf_counter()
        orders = torch.stack([torch.randperm(n, generator=g) for g in shuffles]).to(x.device)  # (R, n)
        loss_sum = torch.zeros(R, dtype=torch.float64, device=x.device)
        correct = torch.zeros(R, dtype=torch.long, device=x.device)
        seen = 0
        for i in range(0, n, batch_size):
            if step >= total:
                break
            idx = orders[:, i : i + batch_size]  # (R, b)
            rows = idx.reshape(-1)  # index_select: ~7x faster than x[idx]
            xb = x.index_select(0, rows).view(R, -1, *x.shape[1:])  # (R, b, ...)
            yb = y.index_select(0, rows).view(R, -1)  # (R, b)
            if plan is not None:  # the gradients are written into the same buffers each step
                losses, out = _mlp_step(batch.params, grads, plan, xb, yb, opt.momentum if fused else 0.0)
            else:
                opt.zero_grad()
                out = batch(xb)  # (R, b, classes)
                losses = nn.functional.cross_entropy(out.flatten(0, 1), yb.flatten(), reduction="none")
                losses = losses.view(R, -1).mean(dim=1)  # each member's mean loss
            if strengths is not None:
                for name in reg_names:
                    w = batch.params[name].flatten(1)
                    size = w.abs().sum(dim=1) if regularizer == "l1" else 0.5 * w.pow(2).sum(dim=1)
                    losses = losses + strengths.to(w) * size
            finite = torch.isfinite(losses.detach())
            if not bool(finite.all()):
                bad = [first + r for r in range(R) if not finite[r]]
                raise TrainingDiverged(
                    f"the training loss of member(s) {bad} became non-finite at epoch "
                    f"{epoch}, step {step}; lower their learning rate."
                )
            if plan is None:
                losses.sum().backward()
            elif strengths is not None:
                with torch.no_grad():
                    for name in reg_names:
                        w = batch.params[name]
                        shape = (-1, *([1] * (w.dim() - 1)))
                        extra = w.sign() if regularizer == "l1" else w
                        # the gradient of every weight was written by _mlp_step or backward()
                        cast(torch.Tensor, w.grad).add_(strengths.to(w).view(shape) * extra)
            for name, mask in batch.masks.items():
                cast(torch.Tensor, batch.params[name].grad).mul_(mask)
            # SGD and Adam leave a weight whose gradient and optimiser state are 0 unchanged, so
            # the pruned weights stay exactly 0 without masking them again (a test checks it)
            if fused:
                opt.descend()
            else:
                opt.step()
            step += 1
            for r, pruner in enumerate(pruners):
                if pruner is None:
                    continue
                if pruner.event_due():
                    batch.store_member(r)
                    pruner.step()
                    _after_prune(batch, r, pruner, opt)
                else:
                    pruner.step_count += 1
            loss_sum += losses.detach().double() * idx.shape[1]
            correct += (out.detach().argmax(-1) == yb).sum(dim=1)
            seen += idx.shape[1]
        if seen == 0:
            break
        seconds = time.perf_counter() - started  # the training's, as prunelab.fit counts it
        val_metrics = _evaluate_members(batch, *val) if val is not None else None
        for r in range(R):
            record = {
                "epoch": epoch + 1,
                "step": step,
                "loss": float(loss_sum[r]) / seen,
                "train_accuracy": int(correct[r]) / seen,
                "seconds": seconds,
            }
            if pruners[r] is not None:
                record["sparsity"] = member_sparsity(batch, r, [t.name for t in pruners[r].targets])
            if val_metrics is not None:
                record.update(val_loss=float(val_metrics[0][r]), val_accuracy=float(val_metrics[1][r]))
            histories[r].append(record)
    return histories


@torch.no_grad()
def _evaluate_members(
    batch: BatchedModels, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's mean cross-entropy and accuracy on ``(x, y)``, in eval mode (the
    batch is left in training mode, as :func:`_train` keeps it)."""
    R = batch.size
    loss_sum = torch.zeros(R, dtype=torch.float64, device=x.device)
    correct = torch.zeros(R, dtype=torch.long, device=x.device)
    batch.eval()
    try:
        for i in range(0, len(x), chunk):
            xb, yb = x[i : i + chunk], y[i : i + chunk]
            out = batch(xb.unsqueeze(0).expand(R, *xb.shape))  # (R, b, classes)
            losses = nn.functional.cross_entropy(out.flatten(0, 1), yb.repeat(R), reduction="none")
            loss_sum += losses.view(R, -1).double().sum(dim=1)
            correct += (out.argmax(-1) == yb).sum(dim=1)
    finally:
        batch.train()
    n = max(len(x), 1)
    return loss_sum / n, correct.double() / n
