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

How it is computed (``mode="exact"``): forward hooks keep each target layer's
input ``x`` and pre-activation ``z = W x + b``; one forward pass; one backward
pass batched over the C columns (``is_grads_batched``) from the logits to the
``z``'s gives ``δ_{c,n} = ∂(a_{n,c}ᵀ f_n)/∂z``. The gradient of that scalar with
respect to ``W`` is ``δ xᵀ`` for a Linear layer on ``(N, in)`` inputs, whose square
is ``δ² (x²)ᵀ``, hence ``h += Σ_c (δ_c²)ᵀ x²`` with no per-sample tensor. When
the weight is shared over positions (Linear on ``(N, …, in)``, Conv2d via
``unfold`` patches ``U``), the per-sample gradient ``Σ_p δ_p U_pᵀ`` is formed
explicitly, a few MB at a time, and squared. Cost: about C backward passes
below the last layer, plus C per-sample weight gradients per layer (the δ's are
held at once unless they pass 512 MB; then the backward is split over classes).

``mode="mc"`` replaces the C columns by ``samples`` draws ``y ~ softmax(f_n)``
(seeded): the gradient of ``CE(f_n, y)`` with respect to ``f_n`` is ``g = p_n − e_y``
and ``E_y[g gᵀ] = diag(p_n) − p_n p_nᵀ = H_n``, so ``(1/S) Σ_s (J_nᵀ g_s)²`` is an
unbiased estimate of the same diagonal; its backward and per-sample gradients
cost S instead of C passes (worth it when C is large or time is short).

Scope and assumptions. The GGN is defined here for the mean softmax
cross-entropy of the model's logits ``(N, C)``: ``loss_fn`` must be
``torch.nn.functional.cross_entropy`` or an ``nn.CrossEntropyLoss()`` with default
arguments (labels are not used: the GGN of cross-entropy does not depend on
them). Targets must be the weights of ``nn.Linear`` or ``nn.Conv2d`` (groups=1),
each module run exactly once per forward, with the sample dimension first.
The model runs in eval mode (modes restored afterwards); weights and ``.grad``
are left untouched. OBD assumes the net sits at a minimum of the training
loss (the first-order term is dropped): prune after training has
(re)converged; an iterative Pruner recomputes ``G`` before every prune.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from prunelab._validation import check_choice, check_number
from prunelab.pruning.criteria import CRITERIA, Criterion
from prunelab.pruning.targets import Target

_CHUNK_BYTES = 4 * 2**20     # per-sample gradients formed at once: cache-sized is fastest
_DELTA_BYTES = 512 * 2**20   # back-propagated vectors δ held at once (else the backward is split)
_WHERE = "obd criterion"


@CRITERIA.register("obd")
class OBD(Criterion):
    """Optimal Brain Damage: score ``½ · h_ww · w²`` with ``h`` the GGN diagonal of
    the mean cross-entropy over the calibration data (see the module docstring).

    ``mode``: ``"exact"`` (C back-propagated columns per sample) or ``"mc"``
    (``samples`` sampled labels per sample, seeded by ``seed``; an unbiased estimate).
    """

    name = "obd"
    needs_data = True

    def __init__(self, mode: str = "exact", samples: int = 1, seed: int = 0):
        self.mode = check_choice("mode", mode, ("exact", "mc"), where=_WHERE)
        self.samples = check_number("samples", samples, where=_WHERE, low=1, integer=True)
        if self.mode == "exact" and self.samples != 1:
            raise ValueError(f"the 'samples' parameter of {_WHERE} applies to mode 'mc' only; "
                             f"mode 'exact' uses every class. Got samples={samples!r} with mode 'exact'.")
        self.seed = check_number("seed", seed, where=_WHERE, low=0, integer=True)
        self._generator = torch.Generator().manual_seed(self.seed)
        self.reset()

    # ------------------------------------------------------------ interface
    def calibrate(self, model: nn.Module, targets: Sequence[Target], batches: list,
                  loss_fn: Callable) -> None:
        """Add the GGN diagonal of every batch ``(x, y)`` to the running sums."""
        batches, loss = self._calibration(batches, loss_fn)
        _check_loss(loss.user)
        for target in targets:
            _check_target(target)
        names = [t.name for t in targets]
        if self._sums is not None and names != self._names:
            raise ValueError(f"{_WHERE}: calibrated on {self._names} before, now given {names}; "
                             f"call reset() first.")
        sums = ([s.clone() for s in self._sums] if self._sums is not None else
                [torch.zeros_like(t.weight, dtype=torch.float64) for t in targets])
        count = self._count
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.enable_grad():
                for batch in batches:
                    count += self._add_batch(model, targets, batch, sums)
        finally:
            for module, training in modes:
                module.training = training
        self._sums, self._count, self._names = sums, count, names

    def hessian_diagonal(self) -> list[torch.Tensor]:
        """``h``: the mean GGN diagonal per target (float64), from the calibrations so far."""
        if self._sums is None or self._count == 0:
            raise ValueError(
                "the obd criterion has no Hessian to score with: pass calibration data "
                "(prune(..., data=(x, y)), Pruner(..., calibration=(x, y)) or pruner.calibrate(data)).")
        return [s / self._count for s in self._sums]

    def scores(self, targets: Sequence[Target]) -> list[torch.Tensor]:
        diagonals = self.hessian_diagonal()
        if [t.name for t in targets] != self._names:
            raise ValueError(f"{_WHERE}: calibrated on {self._names}, asked to score "
                             f"{[t.name for t in targets]}.")
        return [(0.5 * h * t.weight.detach().double().square()).to(t.weight.dtype)
                for t, h in zip(targets, diagonals)]

    def reset(self) -> None:
        self._sums: list[torch.Tensor] | None = None
        self._count = 0
        self._names: list[str] = []

    @property
    def n_samples(self) -> int:
        """Calibration samples accumulated since the last reset."""
        return self._count

    def __repr__(self) -> str:
        if self.mode == "exact":
            return "OBD(mode='exact')"
        return f"OBD(mode='mc', samples={self.samples}, seed={self.seed})"

    # ------------------------------------------------------------ one batch
    def _add_batch(self, model: nn.Module, targets: Sequence[Target], batch,
                   sums: list[torch.Tensor]) -> int:
        """One forward, the batched backward to every ``z``, squared gradients into ``sums``."""
        seen: list[list[tuple[torch.Tensor, int, torch.Tensor]]] = [[] for _ in targets]

        def keeper(i: int):
            def hook(module, args, kwargs, z):
                x_in = args[0] if args else kwargs["input"]
                if not z.requires_grad:           # frozen weights: make z a leaf to differentiate to
                    z = z.detach().requires_grad_()
                seen[i].append((x_in.detach(), x_in._version, z))
                return z.clone()                  # an in-place op after the layer must not overwrite z
            return hook

        handles = [t.module.register_forward_hook(keeper(i), with_kwargs=True)
                   for i, t in enumerate(targets)]
        try:
            logits = batch.call(model)
        finally:
            for handle in handles:
                handle.remove()
        n = _check_forward(targets, seen, logits)
        inputs = [records[0][0] for records in seen]
        zs = [records[0][2] for records in seen]

        p = logits.detach().softmax(dim=1)
        if self.mode == "exact":
            # row c of the batch holds a_{n,c}, column c of A_n: √p_c (e_c − p_n)
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            grad_outputs = p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None, :, :])
        else:
            labels = torch.multinomial(p.cpu().float(), self.samples, replacement=True,
                                       generator=self._generator).T.to(p.device)   # (S, N)
            one_hot = F.one_hot(labels, p.shape[1]).to(p.dtype)
            grad_outputs = (p[None] - one_hot) / math.sqrt(self.samples)

        rows = grad_outputs.shape[0]
        per_row = sum(z.numel() for z in zs) * zs[0].element_size()
        step = max(1, _DELTA_BYTES // max(per_row, 1))
        for start in range(0, rows, step):
            deltas = torch.autograd.grad(logits, zs, grad_outputs[start:start + step],
                                         retain_graph=start + step < rows, is_grads_batched=True,
                                         allow_unused=True)
            for target, x_in, delta, h in zip(targets, inputs, deltas, sums):
                if delta is not None:           # None: this layer does not reach the logits
                    h += _squared_gradients(target.module, x_in, delta).to(h.dtype)
        return n


# ------------------------------------------------------------------ checks
def _check_loss(loss_fn: Callable | None) -> None:
    if loss_fn is None or loss_fn is F.cross_entropy:
        return
    if (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is None
            and loss_fn.ignore_index == -100 and loss_fn.reduction == "mean"
            and loss_fn.label_smoothing == 0.0):
        return
    raise ValueError(
        f"the 'loss_fn' parameter of {_WHERE} must be torch.nn.functional.cross_entropy or "
        f"nn.CrossEntropyLoss() with default arguments: OBD's Gauss-Newton Hessian is defined "
        f"here for the mean softmax cross-entropy of the model's logits. Got {loss_fn!r} instead.")


def _check_target(target: Target) -> None:
    module = target.module
    supported = "OBD supports the weights of nn.Linear and nn.Conv2d (groups=1)"
    if target.param_name != "weight" or not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{_WHERE}: cannot score {target.name!r} ({type(module).__name__}."
                         f"{target.param_name}); {supported}.")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ValueError(f"{_WHERE}: cannot score {target.name!r}, a Conv2d with groups="
                         f"{module.groups}; {supported}.")


def _check_forward(targets, seen, logits) -> int:
    """Every target ran once on a batch with the samples first; return the sample count."""
    for target, records in zip(targets, seen):
        if len(records) != 1:
            raise ValueError(
                f"{_WHERE}: layer {target.module_name!r} ran {len(records)} times in one forward "
                f"pass; OBD needs every pruned layer to run exactly once per forward.")
    if not torch.is_tensor(logits) or logits.dim() != 2:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"{_WHERE}: the model must return logits of shape (N, n_classes); "
                         f"got {shape}.")
    if not torch.isfinite(logits).all():
        raise ValueError(f"{_WHERE}: the model's logits are not finite (nan or inf); "
                         f"OBD needs a model whose softmax is defined.")
    n = logits.shape[0]
    for target, ((x_in, version, _),) in zip(targets, seen):
        if x_in._version != version:
            raise ValueError(f"{_WHERE}: the input of layer {target.module_name!r} was modified in "
                             f"place after the layer ran; OBD needs it unchanged.")
        if x_in.dim() < 2 or x_in.shape[0] != n or (isinstance(target.module, nn.Conv2d) and x_in.dim() != 4):
            raise ValueError(f"{_WHERE}: layer {target.module_name!r} got input of shape "
                             f"{tuple(x_in.shape)} for {n} samples; OBD needs the samples first "
                             f"((N, …, in) for Linear, (N, C, H, W) for Conv2d).")
    return n


# ------------------------------------------------------- squared gradients
def _squared_gradients(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``Σ_c Σ_n (∂(a_{n,c}ᵀ f_n)/∂W)²`` for one layer; ``delta`` is (c, N, *z.shape[1:])."""
    if isinstance(module, nn.Linear):
        if x.dim() == 2:            # per-sample gradient δ xᵀ: its square is δ² (x²)ᵀ
            return delta.square().sum(0).T @ x.square()
        x = x.reshape(x.shape[0], -1, x.shape[-1])                               # (N, M, in)
        delta = delta.reshape(delta.shape[0], x.shape[0], -1, delta.shape[-1])   # (c, N, M, out)
        return _sum_squared(delta, lambda lo, hi: x[lo:hi], "cnmo,nmi->cnoi",
                            shape=(delta.shape[-1], x.shape[-1]), input_size=x[0].numel())
    patches = _Patches(module, x)
    delta = delta.flatten(3)                                                     # (c, N, O, P)
    h = _sum_squared(delta, patches, "cnop,nkp->cnok",
                     shape=(delta.shape[2], patches.rows), input_size=patches.size)
    return h.reshape(module.weight.shape)


def _sum_squared(delta: torch.Tensor, inputs: Callable[[int, int], torch.Tensor], equation: str, *,
                 shape: tuple[int, int], input_size: int) -> torch.Tensor:
    """Σ over classes and samples of the squared per-sample gradients ``einsum(equation)``
    (each of ``shape``), formed in chunks of at most ``_CHUNK_BYTES``; ``inputs(lo, hi)``
    gives the layer inputs of samples ``lo:hi`` (``input_size`` elements each)."""
    n_classes, n = delta.shape[:2]
    item = delta.element_size()
    per_gradient = (shape[0] * shape[1] + delta[0, 0].numel()) * item     # G and its δ, per class
    class_step = max(1, min(n_classes, _CHUNK_BYTES // per_gradient))
    sample_step = max(1, _CHUNK_BYTES // (class_step * per_gradient + input_size * item))
    total = delta.new_zeros(shape)
    for lo in range(0, n, sample_step):
        x = inputs(lo, lo + sample_step)
        for c in range(0, n_classes, class_step):
            g = torch.einsum(equation, delta[c:c + class_step, lo:lo + sample_step], x)
            total += g.square_().sum((0, 1))
    return total


class _Patches:
    """``unfold`` patches of a Conv2d's input, per range of samples: (n, in·kh·kw, P)."""

    def __init__(self, conv: nn.Conv2d, x: torch.Tensor):
        self.conv, self.x = conv, x
        pads = []                                   # F.pad order: (left, right, top, bottom)
        for dim in (1, 0):
            if conv.padding == "valid":
                pads += [0, 0]
            elif conv.padding == "same":
                total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
                pads += [total // 2, total - total // 2]
            else:
                pads += [conv.padding[dim]] * 2
        self.symmetric = pads[0] == pads[1] and pads[2] == pads[3] and conv.padding_mode == "zeros"
        self.pads = pads
        k = conv.kernel_size
        out_h = (x.shape[2] + pads[2] + pads[3] - conv.dilation[0] * (k[0] - 1) - 1) // conv.stride[0] + 1
        out_w = (x.shape[3] + pads[0] + pads[1] - conv.dilation[1] * (k[1] - 1) - 1) // conv.stride[1] + 1
        self.rows = x.shape[1] * k[0] * k[1]
        self.size = self.rows * out_h * out_w                    # elements per sample

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        conv, x = self.conv, self.x[lo:hi]
        if self.symmetric:
            padding = (self.pads[2], self.pads[0])
        else:
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x, padding = F.pad(x, self.pads, mode=mode), 0
        # unfold treats channels independently, so the samples are folded into the channels
        # of one image: one im2col call instead of a (thread-parallel) loop over samples,
        # which costs milliseconds per sample on a busy machine.
        n, channels = x.shape[:2]
        patches = F.unfold(x.reshape(1, n * channels, *x.shape[2:]), conv.kernel_size,
                           dilation=conv.dilation, padding=padding, stride=conv.stride)
        return patches.reshape(n, self.rows, -1)
