"""Optimal Brain Damage (LeCun, Denker & Solla 1989, "Optimal Brain Damage", NIPS 2).

OBD removes the weights whose deletion least increases the training loss ``L``
according to a second-order Taylor expansion at a minimum (gradient zero) in
which the Hessian is taken to be diagonal. The saliency of weight ``w`` is

    s(w) = ½ · h_ww · w²,      h_ww = [G]_ww,

where ``G`` is the generalised Gauss–Newton (GGN) matrix of the mean
softmax-cross-entropy loss over the calibration set: the Levenberg–Marquardt
approximation that LeCun's second-order back-propagation computes, positive
semi-definite, equal to the Hessian where the logits are linear in the weights
(the last layer), and not a layer-wise approximation. Per sample ``n`` with
logits ``f_n``, softmax ``p_n`` and Jacobian ``J_n = ∂f_n/∂w``:

    G = (1/N) Σ_n J_nᵀ H_n J_n,    H_n = ∂²CE/∂f² = diag(p_n) − p_n p_nᵀ = A_n A_nᵀ,
    A_n = diag(√p_n) − p_n √p_nᵀ   (A Aᵀ = diag(p) − 2 p pᵀ + p pᵀ Σ_c p_c),

so that ``diag G = (1/N) Σ_n Σ_c (J_nᵀ a_{n,c})²`` with ``a_{n,c}`` the columns of
``A_n``: each ``J_nᵀ a_{n,c}`` is an ordinary gradient, the one of ``a_{n,c}ᵀ f_n``.
This rewriting of a curvature matrix ``JᵀHJ`` as a sum of squared
back-propagated vectors by factorising the output Hessian is the idea behind
the "exact GGN diagonal" of curvature libraries (Dangel, Kunstner & Hennig 2020,
BackPACK, and Martens & Grosse 2015 for the K-FAC form); the code here is our own.

Token logits ``(N, T, V)``: the loss is the mean cross-entropy over the positions that count
(under next-token prediction the last position predicts nothing; targets equal to ignore_index
drop out), so ``G = (1/M) Σ_{(n,t) counted} J_{n,t}ᵀ H_{n,t} J_{n,t}`` over the M counted
positions, and each (position, class) pair is one column ``a_{n,t,c}``: the output at position
t depends on the inputs at every position, so the columns of different positions are squared
separately. The labels' values never enter (the GGN of cross-entropy does not depend on them),
only which positions count.

How it is computed (``mode="exact"``), two routes:

*Fast route* — the weight of a module that computes ``z = W x + b`` in its own forward, once
(``nn.Linear``, Hugging Face ``Conv1D`` with ``W`` stored ``(in, out)``, ``nn.Conv1d/2d/3d``
including grouped and depthwise): forward hooks keep the input ``x`` and pre-activation ``z``; one forward pass; one
backward pass batched over the columns (``is_grads_batched``) from the logits to the ``z``'s gives
``δ_{c,n} = ∂(a_{n,c}ᵀ f_n)/∂z``. The gradient of that scalar with respect to ``W`` is ``δ xᵀ``
for a Linear layer on ``(N, in)`` inputs, whose square is ``δ² (x²)ᵀ``, hence
``h += Σ_c (δ_c²)ᵀ x²`` with no per-sample tensor. When the weight is shared over positions
(Linear on ``(N, …, in)``, Conv2d via ``unfold`` patches ``U``), the per-sample gradient
``Σ_p δ_p U_pᵀ`` is formed explicitly, a few MB at a time, and squared; for Conv1d/Conv3d
and grouped/depthwise convs the (column, sample) pairs are folded into the channels of one
input and one weight-gradient convolution with ``groups × pairs`` groups gives every pair's
gradient. Cost: about C backward passes below the last layer, plus C per-sample weight
gradients per layer (the δ's are held at once unless they pass 512 MB; then the backward is
split over columns).

*Per-sample route* — every other weight: MultiheadAttention's ``in_proj_weight`` and
``out_proj`` (used functionally), RNN weights (used at every time step), embeddings, a weight
tied to another name, a module run more than once per forward. For each sample its own
forward, then ``∂(a_{n,c}ᵀ f_n)/∂W`` for all columns at once (``is_grads_batched``, or one
backward per column where torch cannot batch it) — the exact per-sample gradients, squared and
summed. Cost: N forwards and N·C (batched) backwards per batch.

``mode="exact"`` needs one column per class and counted position; above
``MAX_EXACT_CLASSES`` (4096) classes it refuses, after the first forward and before any backward,
and suggests ``mode="mc"``.

``mode="mc"`` replaces the C columns by ``samples`` draws ``y ~ softmax(f_n)``
(seeded): the gradient of ``CE(f_n, y)`` with respect to ``f_n`` is ``g = p_n − e_y``
and ``E_y[g gᵀ] = diag(p_n) − p_n p_nᵀ = H_n``, so ``(1/S) Σ_s (J_nᵀ g_s)²`` is an
unbiased estimate of the same diagonal; its backward and per-sample gradients
cost S instead of C passes (worth it when C is large or time is short). For token logits a label is drawn at every
counted position and one backward covers all positions of a sample: ``v = Σ_t J_tᵀ g_t`` has
``E[v vᵀ] = Σ_t J_tᵀ H_t J_t`` because the cross terms vanish (``E[g_t] = 0``, independent draws),
so S rows per batch suffice whatever T and V are.

Scope and assumptions. The GGN is defined here for the mean softmax cross-entropy of the
model's logits — ``(N, C)`` classes or ``(N, T, V)`` tokens, read from a tensor, tuple, dict or
Hugging Face ``ModelOutput`` (``output_key`` names another entry): ``loss_fn`` must be None (the
loss inferred from the shapes, see :mod:`prunelab.inputs`), ``torch.nn.functional.cross_entropy``
or an ``nn.CrossEntropyLoss()`` with default arguments. Samples come first in every input and in
the output, and a sample's output does not depend on the other samples (eval mode). The model
runs in eval mode (modes restored afterwards); weights, ``requires_grad`` and ``.grad`` are left
untouched. A target the logits do not depend on is refused by name. OBD assumes the net sits at a
minimum of the training loss (the first-order term is dropped): prune after training has
(re)converged; an iterative Pruner recomputes ``G`` before every prune.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import cast

import torch
import torch.nn.grad
from torch import nn
from torch.nn import functional as F

from prunelab._hooks import eval_mode
from prunelab._validation import MAX_REPEATS, SEED, Interval, Options, validate_params
from prunelab.inputs import IGNORE_INDEX, Batch, Loss, is_cross_entropy, token_ids
from prunelab.pruning.criteria import CRITERIA, Criterion
from prunelab.pruning.targets import CONV_TYPES, Target

_CHUNK_BYTES = 4 * 2**20  # per-sample gradients formed at once: cache-sized is fastest
_DELTA_BYTES = 512 * 2**20  # back-propagated vectors δ held at once (else the backward is split)
_PER_SAMPLE_BYTES = 64 * 2**20  # per-sample weight gradients held at once on the per-sample route
#: mode="exact" back-propagates one column per class (and counted position); above this many
#: classes it refuses and suggests mode="mc".
MAX_EXACT_CLASSES = 4096
_WHERE = "obd criterion"


@CRITERIA.register("obd")
class OBD(Criterion):
    """Optimal Brain Damage: score ``½ · h_ww · w²`` with ``h`` the GGN diagonal of
    the mean cross-entropy over the calibration data (over samples for class logits, over
    counted positions for token logits; see the module docstring).

    ``mode``: ``"exact"`` (C back-propagated columns per sample) or ``"mc"``
    (``samples`` sampled labels per sample, seeded by ``seed``; an unbiased estimate).
    """

    name = "obd"
    needs_data = True
    _sums: list[torch.Tensor] | None  # the running GGN sums, per target (set by reset() and calibrate())
    _count: int
    _names: list[str]

    @validate_params(
        {"mode": [Options({"exact", "mc"})], "samples": [Interval(Integral, 1, MAX_REPEATS)], "seed": [SEED]},
        where=_WHERE,
    )
    def __init__(self, mode: str = "exact", samples: int = 1, seed: int = 0):
        self.mode = mode
        self.samples = int(samples)
        if self.mode == "exact" and self.samples != 1:
            raise ValueError(
                f"the 'samples' parameter of {_WHERE} applies to mode 'mc' only; "
                f"mode 'exact' uses every class. Got samples={samples!r} with mode 'exact'."
            )
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.reset()

    # ------------------------------------------------------------ interface
    def calibrate(self, model: nn.Module, targets: Sequence[Target], batches: list, loss_fn: Callable) -> None:
        """Add the GGN diagonal of every batch to the running sums."""
        batches, loss = self._calibration(batches, loss_fn)
        _check_loss(loss.user)
        names = [t.name for t in targets]
        if self._sums is not None and names != self._names:
            raise ValueError(f"{_WHERE}: calibrated on {self._names} before, now given {names}; call reset() first.")
        fast = _fast_routes(model, targets)
        sums = (
            [s.clone() for s in self._sums]
            if self._sums is not None
            else [torch.zeros_like(t.weight, dtype=torch.float64) for t in targets]
        )
        count = self._count
        with eval_mode(model), torch.enable_grad():
            for batch in batches:
                count += self._add_batch(model, targets, fast, batch, sums, loss)
        self._sums, self._count, self._names = sums, count, names

    def hessian_diagonal(self) -> list[torch.Tensor]:
        """``h``: the mean GGN diagonal per target (float64), from the calibrations so far."""
        if self._sums is None or self._count == 0:
            raise ValueError(
                "the obd criterion has no Hessian to score with: pass calibration data "
                "(prune(..., data=(x, y)), Pruner(..., calibration=(x, y)) or pruner.calibrate(data))."
            )
        return [s / self._count for s in self._sums]

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        return list(self.iter_scores(targets))

    def iter_scores(self, targets: Sequence[Target]):
        """One target's ``½ · h · w²`` at a time (its ``h`` made when it is scored)."""
        if self._sums is None or self._count == 0:
            self.hessian_diagonal()  # raises: nothing calibrated
        assert self._sums is not None
        if [t.name for t in targets] != self._names:
            raise ValueError(f"{_WHERE}: calibrated on {self._names}, asked to score {[t.name for t in targets]}.")
        for t, s in zip(targets, self._sums):
            h = s / self._count
            yield (0.5 * h * t.weight.detach().double().square()).to(t.weight.dtype)

    def reset(self) -> None:
        self._sums = None
        self._count = 0
        self._names = []

    @property
    def n_samples(self) -> int:
        """Calibration samples accumulated since the last reset."""
        return self._count

    def __repr__(self) -> str:
        if self.mode == "exact":
            return "OBD(mode='exact')"
        return f"OBD(mode='mc', samples={self.samples}, seed={self.seed})"

    # ------------------------------------------------------------ one batch
    def _add_batch(
        self,
        model: nn.Module,
        targets: Sequence[Target],
        fast: list[str | None],
        batch: Batch,
        sums: list[torch.Tensor],
        loss: Loss,
    ) -> int:
        """One forward; the batched backward to every hooked ``z`` (fast routes) and the per-sample
        route for the rest; squared gradients into ``sums``. Returns the positions counted."""
        seen: list[list] = [[] for _ in targets]
        handles = [
            t.module.register_forward_hook(_keeper(seen[i]), with_kwargs=True) for i, t in enumerate(targets) if fast[i]
        ]
        try:
            with torch.set_grad_enabled(bool(handles)):
                logits = loss.logits(batch.call(model))
        finally:
            for handle in handles:
                handle.remove()
        _check_logits(logits, self.mode)
        counted = _counted(logits, batch)
        rows = _Rows(logits.detach().softmax(dim=-1), counted, self)
        hooked = [_hooked(route, records, logits.shape[0]) if route else None for route, records in zip(fast, seen)]
        chosen = [i for i, h in enumerate(hooked) if h is not None]
        if chosen:
            _fast_pass(
                logits,
                [fast[i] for i in chosen],
                [targets[i] for i in chosen],
                [hooked[i] for i in chosen],
                [sums[i] for i in chosen],
                rows,
            )
        rest = [i for i, h in enumerate(hooked) if h is None]
        if rest:
            _per_sample_pass(model, batch, [targets[i] for i in rest], [sums[i] for i in rest], rows, loss)
        return int(counted.sum())


# ------------------------------------------------------------------ checks
def _check_loss(loss_fn: Callable | None) -> None:
    if is_cross_entropy(loss_fn):
        return
    raise ValueError(
        f"the 'loss_fn' parameter of {_WHERE} must be None (the loss inferred from the output's shape), "
        f"torch.nn.functional.cross_entropy or nn.CrossEntropyLoss() with default arguments: OBD's "
        f"Gauss-Newton Hessian is defined here for the mean softmax cross-entropy of the model's logits. "
        f"Got {loss_fn!r} instead."
    )


def _check_logits(logits: torch.Tensor, mode: str) -> None:
    if logits.dim() not in (2, 3):
        raise ValueError(
            f"{_WHERE}: the model's logits have shape {tuple(logits.shape)}; OBD's Gauss-Newton "
            f"diagonal is defined for class logits (N, classes) and token logits "
            f"(N, tokens, vocabulary). Name another output entry with output_key=."
        )
    if mode == "exact" and logits.shape[-1] > MAX_EXACT_CLASSES:
        raise ValueError(
            f"{_WHERE}: mode='exact' back-propagates one column per class and counted position, "
            f"and the model has {logits.shape[-1]} classes, over the bound of {MAX_EXACT_CLASSES} "
            f"(obd.MAX_EXACT_CLASSES); use mode='mc' (an unbiased estimate at 'samples' backward "
            f"passes per batch)."
        )
    if not torch.isfinite(logits).all():
        raise ValueError(
            f"{_WHERE}: the model's logits are not finite (nan or inf); OBD needs a model whose softmax is defined."
        )


def _counted(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Which outputs the mean cross-entropy counts: (N,) for class logits, (N, T) for tokens (under
    next-token prediction the last position predicts nothing; targets equal to ignore_index drop out).
    The GGN of cross-entropy does not depend on the labels' values, only on which positions count."""
    n = logits.shape[0]
    targets = batch.targets
    if logits.dim() == 2:
        if targets is not None and targets.shape == (n,):
            return (targets != IGNORE_INDEX).to(logits.device)
        return torch.ones(n, dtype=torch.bool, device=logits.device)
    t = logits.shape[1]
    if targets is not None and not batch.hf_labels:
        if targets.shape != (n, t):
            raise ValueError(
                f"{_WHERE}: token logits {tuple(logits.shape)} need targets of shape ({n}, {t}); "
                f"got {tuple(targets.shape)}."
            )
        return (targets != IGNORE_INDEX).to(logits.device)
    ids = targets if targets is not None else token_ids(batch)
    counted = torch.zeros(n, t, dtype=torch.bool, device=logits.device)
    if ids is not None and ids.shape == (n, t):
        counted[:, :-1] = (ids[:, 1:] != IGNORE_INDEX).to(logits.device)
    else:
        counted[:, :-1] = True
    return counted


# ------------------------------------------------------- rows a_{n,c}
class _Rows:
    """The vectors back-propagated from the logits, in chunks ``(r, *logits.shape)``.

    ``exact``: one row per (counted position t, class c) holding ``a_{n,t,c} = √p_c (e_c − p)`` at
    position t of every sample (zero elsewhere, and zero for samples where t does not count);
    ``mc``: ``samples`` rows holding ``(p − e_y)/√S`` at every counted position, ``y ~ p`` drawn
    per position (the cross terms between positions vanish in expectation: still unbiased)."""

    def __init__(self, p: torch.Tensor, counted: torch.Tensor, obd: OBD | None, drawn=None):
        self.shape: tuple[int, ...] = p.shape
        self.p = p.reshape(p.shape[0], -1, p.shape[-1])  # (N, T, C); T = 1 for classes
        self.counted = counted.reshape(p.shape[0], -1)
        self.mode = obd.mode if obd is not None else "mc"
        if self.mode == "mc":
            self.drawn = drawn if drawn is not None else self._draw(cast(OBD, obd))  # drawn or an OBD's
            self.n = self.drawn.shape[0]
        else:
            self.positions = torch.nonzero(self.counted.any(0)).flatten()
            self.n = len(self.positions) * self.p.shape[-1]

    def _draw(self, obd: OBD) -> torch.Tensor:
        n, t, c = self.p.shape
        labels = torch.multinomial(
            self.p.reshape(n * t, c).cpu().float(), obd.samples, replacement=True, generator=obd._generator
        ).T.to(self.p.device)  # (S, N·T)
        one_hot = F.one_hot(labels.reshape(-1, n, t), c).to(self.p.dtype)
        rows = (self.p[None] - one_hot) / math.sqrt(obd.samples)
        return rows * self.counted[None, :, :, None].to(rows.dtype)

    def sample(self, i: int) -> _Rows:
        """The rows of sample ``i`` alone (for the per-sample route)."""
        if self.mode == "mc":
            return _Rows(
                self.p[i : i + 1].reshape(1, *self.shape[1:]), self.counted[i : i + 1], None, self.drawn[:, i : i + 1]
            )
        rows = _Rows.__new__(_Rows)
        rows.shape, rows.mode = (1, *self.shape[1:]), "exact"
        rows.p, rows.counted = self.p[i : i + 1], self.counted[i : i + 1]
        rows.positions = torch.nonzero(rows.counted[0]).flatten()
        rows.n = len(rows.positions) * rows.p.shape[-1]
        return rows

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        if self.mode == "mc":
            return self.drawn[start:stop].reshape(stop - start, *self.shape)
        n, t, c = self.p.shape
        index = torch.arange(start, stop, device=self.p.device)
        pos, cls = self.positions[index // c], index % c
        p_at = self.p[:, pos, :]  # (N, r, C)
        eye = F.one_hot(cls, c).to(p_at.dtype)
        a = p_at.gather(2, cls[None, :, None].expand(n, -1, 1)).sqrt() * (eye[None] - p_at)
        a = a * self.counted[:, pos, None].to(a.dtype)
        out = a.new_zeros(stop - start, n, t, c)
        out[torch.arange(stop - start), :, pos, :] = a.transpose(0, 1)
        return out.reshape(stop - start, *self.shape)


# ------------------------------------------------------------ the fast route
def _fast_routes(model: nn.Module, targets: Sequence[Target]) -> list[str | None]:
    """``"linear"``, ``"transposed"`` (HF Conv1D), ``"conv2d"`` (Conv2d, groups=1: ``unfold`` patches) or
    ``"conv"`` (Conv1d/3d, grouped and depthwise convs: per-sample gradients by grouped convolution) for a
    target whose module
    computes ``z = W x (+ b)`` in its own forward, so hooks see x and z; None (the per-sample route)
    for every other target, and for a weight tied to another name (its uses are not all in one module)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    routes: list[str | None] = []
    for t in targets:
        module = t.module
        if t.param_name != "weight" or uses.get(id(t.weight), 0) > 1:
            routes.append(None)
        elif isinstance(module, nn.Linear):
            routes.append("linear")
        elif t.layout == "transposed":
            routes.append("transposed")
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            routes.append("conv2d")
        elif isinstance(module, CONV_TYPES):
            routes.append("conv")
        else:
            routes.append(None)
    return routes


def _keeper(records: list):
    def hook(module, args, kwargs, z):
        x_in = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not torch.is_tensor(x_in) or not torch.is_tensor(z):
            records.append(None)
            return None
        if not z.requires_grad:  # frozen weights: make z a leaf to differentiate to
            z = z.detach().requires_grad_()
        records.append((x_in.detach(), x_in._version, z))
        return z.clone()  # an in-place op after the layer must not overwrite z

    return hook


def _hooked(route: str, records: list, n: int):
    """``(x, z)`` when the module ran once on a samples-first input left unchanged; else None (the
    target then takes the per-sample route: a module run twice or not at all, e.g. MultiheadAttention's
    out_proj, which the attention calls functionally)."""
    if len(records) != 1 or records[0] is None:
        return None
    x, version, z = records[0]
    if x._version != version or x.dim() < 2 or x.shape[0] != n or (route.startswith("conv") and x.dim() != z.dim()):
        return None
    return x, z


def _unused(target: Target) -> ValueError:
    return ValueError(
        f"{_WHERE}: the model's output does not depend on {target.name!r} (the forward pass "
        f"never uses it, or not on the way to the logits); leave it out of 'layers'."
    )


def _fast_pass(logits, routes, targets, hooked, sums, rows: _Rows) -> None:
    inputs = [x for x, _ in hooked]
    zs = [z for _, z in hooked]
    per_row = sum(z.numel() for z in zs) * zs[0].element_size()
    step = max(1, _DELTA_BYTES // max(per_row, 1))
    for start in range(0, rows.n, step):
        stop = min(rows.n, start + step)
        deltas = torch.autograd.grad(
            logits, zs, rows.chunk(start, stop), retain_graph=stop < rows.n, is_grads_batched=True, allow_unused=True
        )
        for route, target, x_in, delta, h in zip(routes, targets, inputs, deltas, sums):
            if delta is None:
                raise _unused(target)
            h += _squared_gradients(route, target.module, x_in, delta).to(h.dtype)


# ------------------------------------------------------ the per-sample route
def _per_sample_pass(model, batch: Batch, targets: Sequence[Target], sums, rows: _Rows, loss: Loss) -> None:
    """For each sample n, its own forward, then ``∂(rᵀ f_n)/∂W`` for every row r, all rows at once
    (``is_grads_batched``; a loop over rows where torch cannot batch the backward): exact per-sample
    gradients of any weight, however the model uses it (functionally, over time steps, tied)."""
    params = [t.weight for t in targets]
    flags = [p.requires_grad for p in params]
    step = max(1, _PER_SAMPLE_BYTES // (8 * sum(p.numel() for p in params)))
    try:
        for p in params:
            p.requires_grad_(True)
        if batch.size != rows.shape[0]:
            raise ValueError(
                f"{_WHERE}: the batch holds {batch.size} samples but the logits "
                f"{tuple(rows.shape)} are for {rows.shape[0]}; OBD needs the samples first in "
                f"every input and in the output."
            )
        for i in range(batch.size):
            sample_rows = rows.sample(i)
            if sample_rows.n == 0:
                continue
            logits = loss.logits(batch.slice(i, i + 1).call(model))
            if logits.shape != sample_rows.shape:
                raise ValueError(
                    f"{_WHERE}: scoring {', '.join(t.name for t in targets)} needs one forward per "
                    f"sample, and sample {i} alone gave logits {tuple(logits.shape)} where "
                    f"{tuple(sample_rows.shape)} was expected; OBD needs the samples first in "
                    f"every input and in the output."
                )
            for start in range(0, sample_rows.n, step):
                stop = min(sample_rows.n, start + step)
                grads = _batched_grad(logits, params, sample_rows.chunk(start, stop))
                for t, g, h in zip(targets, grads, sums):
                    if g is None:
                        raise _unused(t)
                    h += g.square().sum(0).to(h.dtype)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _batched_grad(logits, params, grad_rows) -> list:
    try:
        return torch.autograd.grad(
            logits, params, grad_rows, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
    except RuntimeError:  # an op without a batching rule: one backward per row
        per_row = [torch.autograd.grad(logits, params, row, retain_graph=True, allow_unused=True) for row in grad_rows]
        return [None if grads[0] is None else torch.stack(grads) for grads in zip(*per_row)]


# ------------------------------------------------------- squared gradients
def _squared_gradients(route: str, module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``Σ_c Σ_n (∂(a_{n,c}ᵀ f_n)/∂W)²`` for one layer; ``delta`` is (c, N, *z.shape[1:])."""
    if route == "conv":
        return _conv_squared(cast("nn.Conv1d | nn.Conv2d | nn.Conv3d", module), x, delta)  # the conv route
    if route == "transposed":  # HF Conv1D: z = x W + b with W (in, out), the Linear case transposed
        return _squared_gradients("linear", module, x, delta).T
    if route == "linear":
        if x.dim() == 2:  # per-sample gradient δ xᵀ: its square is δ² (x²)ᵀ
            return delta.square().sum(0).T @ x.square()
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (N, M, in)
        delta = delta.reshape(delta.shape[0], x.shape[0], -1, delta.shape[-1])  # (c, N, M, out)
        return _sum_squared(
            delta,
            lambda lo, hi: x[lo:hi],
            "cnmo,nmi->cnoi",
            shape=(delta.shape[-1], x.shape[-1]),
            input_size=x[0].numel(),
        )
    conv = cast(nn.Conv2d, module)  # the conv2d route
    patches = _Patches(conv, x)
    delta = delta.flatten(3)  # (c, N, O, P)
    h = _sum_squared(delta, patches, "cnop,nkp->cnok", shape=(delta.shape[2], patches.rows), input_size=patches.size)
    return h.reshape(conv.weight.shape)


def _sum_squared(
    delta: torch.Tensor,
    inputs: Callable[[int, int], torch.Tensor],
    equation: str,
    *,
    shape: tuple[int, int],
    input_size: int,
) -> torch.Tensor:
    """Σ over classes and samples of the squared per-sample gradients ``einsum(equation)``
    (each of ``shape``), formed in chunks of at most ``_CHUNK_BYTES``; ``inputs(lo, hi)``
    gives the layer inputs of samples ``lo:hi`` (``input_size`` elements each)."""
    n_classes, n = delta.shape[:2]
    item = delta.element_size()
    per_gradient = (shape[0] * shape[1] + delta[0, 0].numel()) * item  # G and its δ, per class
    class_step = max(1, min(n_classes, _CHUNK_BYTES // per_gradient))
    sample_step = max(1, _CHUNK_BYTES // (class_step * per_gradient + input_size * item))
    total = delta.new_zeros(shape)
    for lo in range(0, n, sample_step):
        x = inputs(lo, lo + sample_step)
        for c in range(0, n_classes, class_step):
            g = torch.einsum(equation, delta[c : c + class_step, lo : lo + sample_step], x)
            total += g.square_().sum((0, 1))
    return total


class _Patches:
    """``unfold`` patches of a Conv2d's input, per range of samples: (n, in·kh·kw, P)."""

    def __init__(self, conv: nn.Conv2d, x: torch.Tensor):
        self.conv, self.x = conv, x
        pads: list[int] = []  # F.pad order: (left, right, top, bottom)
        for dim in (1, 0):
            if conv.padding == "valid":
                pads += [0, 0]
            elif conv.padding == "same":
                total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
                pads += [total // 2, total - total // 2]
            else:
                pads += [cast("tuple[int, ...]", conv.padding)[dim]] * 2  # neither 'valid' nor 'same'
        self.symmetric = pads[0] == pads[1] and pads[2] == pads[3] and conv.padding_mode == "zeros"
        self.pads = pads
        k = conv.kernel_size
        out_h = (x.shape[2] + pads[2] + pads[3] - conv.dilation[0] * (k[0] - 1) - 1) // conv.stride[0] + 1
        out_w = (x.shape[3] + pads[0] + pads[1] - conv.dilation[1] * (k[1] - 1) - 1) // conv.stride[1] + 1
        self.rows = x.shape[1] * k[0] * k[1]
        self.size = self.rows * out_h * out_w  # elements per sample

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        conv, x = self.conv, self.x[lo:hi]
        padding: tuple[int, int] | int
        if self.symmetric:
            padding = (self.pads[2], self.pads[0])
        else:
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x, padding = F.pad(x, self.pads, mode=mode), 0
        # unfold treats channels independently, so the samples are folded into the channels
        # of one image: one im2col call instead of a (thread-parallel) loop over samples,
        # which costs milliseconds per sample on a busy machine.
        n, channels = x.shape[:2]
        patches = F.unfold(
            x.reshape(1, n * channels, *x.shape[2:]),
            conv.kernel_size,
            dilation=conv.dilation,
            padding=padding,
            stride=conv.stride,
        )
        return patches.reshape(n, self.rows, -1)


_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _conv_padding(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input padded as the conv pads it (for 'same', circular, reflect...), and the padding left."""
    dims = conv.weight.dim() - 2
    if conv.padding == "valid":
        return x, (0,) * dims
    if conv.padding != "same" and conv.padding_mode == "zeros":
        return x, tuple(cast("tuple[int, ...]", conv.padding))  # neither 'valid' nor 'same'
    pads: list[int] = []  # F.pad order: last dimension first
    for d in reversed(range(dims)):
        if conv.padding == "same":
            total = conv.dilation[d] * (conv.kernel_size[d] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [cast("tuple[int, ...]", conv.padding)[d]] * 2  # neither 'valid' nor 'same'
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode), (0,) * dims


def _conv_squared(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Σ over rows and samples of the squared per-sample weight gradients of any Conv1d/2d/3d
    (grouped, depthwise): the (row, sample) pairs are folded into the channels of one input, with
    ``groups × pairs`` groups, so that one weight-gradient convolution gives every pair's gradient."""
    x, padding = _conv_padding(conv, x)
    weight_shape = conv.weight.shape
    n_rows, n = delta.shape[:2]
    pairs = delta.reshape(n_rows * n, *delta.shape[2:])  # pair k = (row k // n, sample k % n)
    per_pair = (conv.weight.numel() + x[0].numel() + pairs[0].numel()) * delta.element_size()
    step = max(1, _CHUNK_BYTES // per_pair)
    grad = _CONV_WEIGHT_GRAD[conv.weight.dim() - 2]
    total = delta.new_zeros(weight_shape)
    for lo in range(0, len(pairs), step):
        chunk = pairs[lo : lo + step]
        k = len(chunk)
        inputs = x[torch.arange(lo, lo + k, device=x.device) % n]
        g = grad(
            inputs.reshape(1, -1, *x.shape[2:]),
            (k * weight_shape[0], *weight_shape[1:]),
            chunk.reshape(1, -1, *chunk.shape[2:]),
            stride=conv.stride,
            padding=padding,
            dilation=conv.dilation,
            groups=k * conv.groups,
        )
        total += g.reshape(k, *weight_shape).square_().sum(0)
    return total
