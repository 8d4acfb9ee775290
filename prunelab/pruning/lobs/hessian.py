"""Layer-wise Hessians for L-OBS (Dong et al. 2017; docs/methods.md §1).

For a layer ``z = W x̃`` the layer-wise error ``E = (1/n) ‖Ẑ − Z‖²_F`` over n input
columns has, for every output row of W, the same Hessian

    H = (1/n) Σ_j x̃_j x̃_jᵀ,     x̃ = [x; 1] when the bias takes part (it is never
                                  pruned, but it absorbs part of the compensation).

What a column x is depends on the target kind (:func:`unsupported` says which kinds apply):

- ``nn.Linear`` and Hugging Face ``Conv1D``: one column per input vector (every position of
  a sequence). Conv1D stores W as ``(in, out)``; the solvers work on ``Target.matrix()``.
- ``nn.Conv1d/2d/3d``: every sliding-window patch is a column (``unfold``, or its N-d
  equivalent, with the layer's kernel, stride, padding, padding mode and dilation), ordered
  like ``W.reshape(out, -1)``. A grouped (or depthwise) conv has one Hessian per group, from
  that group's input channels, for that group's output rows.
- ``nn.MultiheadAttention``: the packed ``in_proj_weight`` has its q, k, v row blocks fed by
  the query, key and value inputs — one shared Hessian for self-attention (one tensor for all
  three), three otherwise; ``q/k/v_proj_weight`` take their own input. ``out_proj`` reads the
  attention context, which MultiheadAttention never passes through the ``out_proj`` module
  (it calls ``F.linear``): it is recomputed by :func:`attention_context` — the module's own
  functional forward with an identity output projection — and checked against the module's
  real output.
- RNNs: ``weight_ih_l0`` (and ``_reverse``) read the input sequence. Every other weight reads
  states the module does not expose (a deeper layer's input is the layer below's output;
  ``weight_hh`` reads ``h_{t-1}``, or ``h_{t+1}`` in the reverse direction): they are recomputed
  one layer at a time from the module's own weights (:func:`rnn_layer_inputs`), from padded
  tensors (not a PackedSequence). An LSTM with ``proj_size`` is refused.

Each batch's product ``XᵀX`` is a float32 matrix product; the sums over batches are kept in
float64. The bias row and column (``Σx`` and n) are added without copying a column of ones.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from prunelab.inputs import forward_batches
from prunelab.pruning.problems import PruneSetting
from prunelab.pruning.targets import Target


@dataclass
class LayerHessian:
    name: str
    xtx: torch.Tensor  # Σ x̃ x̃ᵀ, float64: (d, d), or (groups, d, d) with one per row block
    n: int  # number of input columns summed (of the first group)
    with_bias: bool  # x̃ carries a trailing 1 for the bias
    seconds: float = 0.0
    group_n: list = field(default_factory=list)  # columns per group when there are several

    @property
    def groups(self) -> int:
        return 1 if self.xtx.dim() == 2 else self.xtx.shape[0]

    @property
    def H(self) -> torch.Tensor:
        """``(1/n) Σ x̃ x̃ᵀ`` (undamped); ``(groups, d, d)`` for several groups."""
        if self.xtx.dim() == 2:
            return self.xtx / max(self.n, 1)
        counts = torch.tensor([max(c, 1) for c in self.group_n], dtype=self.xtx.dtype)
        return self.xtx / counts[:, None, None]

    def part(self, g: int) -> LayerHessian:
        """The Hessian of row block ``g`` alone."""
        if self.xtx.dim() == 2:
            return self
        return LayerHessian(self.name, self.xtx[g], self.group_n[g], self.with_bias, self.seconds)


# ------------------------------------------------------------------ which targets apply
def attention_parents(model: nn.Module) -> dict[int, nn.MultiheadAttention]:
    """``{id(out_proj module): its MultiheadAttention}``: out_proj is never called as a module."""
    return {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def unsupported(target: Target, parents: dict | None = None) -> str | None:
    """Why the layer-wise Hessian does not apply to ``target``, or None when it does."""
    layout, module, pname = target.layout, target.module, target.param_name
    if layout in ("transposed", "conv"):
        return None
    if layout == "linear":
        if parents is not None and id(module) in parents and parents[id(module)].out_proj is module:
            mha = parents[id(module)]
            if mha.bias_k is not None or mha.add_zero_attn:
                return "its MultiheadAttention adds bias_k/bias_v or zero attention, which the context capture does not cover"
        return None
    if layout == "attention":
        return None
    if layout == "recurrent":
        if getattr(module, "proj_size", 0):
            return "an LSTM with proj_size has projected hidden states the module does not expose"
        return None
    if layout == "embedding":
        return "an embedding is a lookup table: it has no input matrix for the layer-wise Hessian"
    return f"the '{pname}' of a {target.kind} is not a Linear-like weight"


class LayerSkipped(UserWarning):
    """A default target that a calibration-based method (an OBS solver, Wanda) cannot see was left dense."""


def skip_unsupported(setting: PruneSetting, who: str, verb: str = "prune", extra=None) -> dict[str, str]:
    """The setting's targets whose inputs ``who`` cannot see (:func:`unsupported`, or ``extra(target)``
    giving a reason): a layer named in ``layers=`` raises one error naming it; default targets are
    returned as ``{layer: reason}`` — left dense, with one :class:`LayerSkipped` warning."""
    parents = attention_parents(setting.model)
    named = setting.layers_named
    skipped = {}
    for target in setting.targets:
        reason = unsupported(target, parents)
        if reason is None and extra is not None:
            reason = extra(target)
        if reason is None:
            continue
        if named:
            raise ValueError(
                f"{who} cannot {verb} {target.name!r} ({target.kind}): {reason}. Leave it out of 'layers'."
            )
        skipped[target.name] = reason
    if skipped:
        if len(skipped) == len(setting.targets):
            raise ValueError(
                f"{who} can {verb} none of the model's layers: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            )
        warnings.warn(
            LayerSkipped(
                f"{who} leaves {len(skipped)} layer(s) dense: "
                + "; ".join(f"{k} ({v})" for k, v in skipped.items())
                + ". Listed in criterion.skipped and each prune's report."
            ),
            stacklevel=5,
        )
    return skipped


def check_target(target: Target, where: str = "L-OBS", parents: dict | None = None) -> None:
    reason = unsupported(target, parents)
    if reason is not None:
        raise ValueError(f"{where} cannot prune {target.name!r} ({target.kind}): {reason}. Leave it out of 'layers'.")


# ------------------------------------------------------------------ input columns
def conv_columns(module: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A conv layer's input patches as ``(groups, n, in/groups · prod(kernel))``, one row per
    output position, each group's columns ordered like its rows of ``W.reshape(out, -1)``."""
    dims = len(module.kernel_size)
    if x.dim() == dims + 1:  # unbatched input
        x = x.unsqueeze(0)
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )  # (N, d, P)
        cols = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
            x = x.unfold(2 + i, (k - 1) * dil + 1, s)[..., ::dil]
        # (N, C, o1..od, k1..kd) -> (N·P, C·k1..kd)
        order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
        x = x.permute(order)
        cols = x.reshape(-1, math.prod(x.shape[1 + dims :]))
    g = module.groups
    return cols[None] if g == 1 else cols.reshape(len(cols), g, -1).transpose(0, 1)


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _bind_attention(module, args, kwargs) -> dict:
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def attention_context(module: nn.MultiheadAttention, call: dict) -> torch.Tensor:
    """The attention context (heads concatenated, before ``out_proj``) of one call, by the
    module's own functional forward with an identity output projection."""
    q, k, v = call["query"], call["key"], call["value"]
    batched = q.dim() == 3
    if module.batch_first and batched:
        q, k, v = (t.transpose(1, 0) for t in (q, k, v))
    E = module.embed_dim
    eye = torch.eye(E, dtype=q.dtype, device=q.device)
    separate = not module._qkv_same_embed_dim
    context, _ = F.multi_head_attention_forward(
        q,
        k,
        v,
        E,
        module.num_heads,
        module.in_proj_weight,
        module.in_proj_bias,
        module.bias_k,
        module.bias_v,
        module.add_zero_attn,
        0.0,
        eye,
        torch.zeros(E, dtype=q.dtype, device=q.device),
        training=False,
        key_padding_mask=call["key_padding_mask"],
        need_weights=False,
        attn_mask=call["attn_mask"],
        use_separate_proj_weight=separate,
        q_proj_weight=module.q_proj_weight if separate else None,
        k_proj_weight=module.k_proj_weight if separate else None,
        v_proj_weight=module.v_proj_weight if separate else None,
        is_causal=call["is_causal"],
    )
    if module.batch_first and batched:
        context = context.transpose(1, 0)
    return context


def _attention_columns(target: Target, mha, call: dict, output, name: str):
    if target.module is not mha:  # out_proj: the recomputed context
        context = attention_context(mha, call)
        real = output[0] if isinstance(output, tuple) else output
        again = F.linear(context, mha.out_proj.weight, mha.out_proj.bias)
        if not torch.allclose(again, real, rtol=1e-3, atol=1e-4 * (1 + float(real.abs().max()))):
            raise ValueError(
                f"L-OBS: the recomputed attention context of {name!r} does not reproduce its "
                f"MultiheadAttention's output (max difference {float((again - real).abs().max()):.3g}); "
                f"cannot collect its input Hessian."
            )
        return [context.reshape(-1, context.shape[-1])], ("context", id(target))
    q, k, v = call["query"], call["key"], call["value"]
    if target.param_name != "in_proj_weight":
        x = {"q_proj_weight": q, "k_proj_weight": k, "v_proj_weight": v}[target.param_name]
        return [x.reshape(-1, x.shape[-1])], _key(x)
    if q is k and k is v:  # self-attention: one input for q, k, v
        return [q.reshape(-1, q.shape[-1])], _key(q)
    return [t.reshape(-1, t.shape[-1]) for t in (q, k, v)], ("qkv", id(target))


def _recurrent_columns(target: Target, args, output, name: str):
    module, x = cast(nn.RNNBase, target.module), args[0]  # a recurrent layout: an RNN/LSTM/GRU
    pname = target.param_name
    if pname in ("weight_ih_l0", "weight_ih_l0_reverse"):
        data = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
        return [data.reshape(-1, data.shape[-1])], _key(data)
    if isinstance(x, nn.utils.rnn.PackedSequence):
        raise ValueError(
            f"L-OBS: {name!r} reads hidden states, which cannot be recomputed from a "
            f"PackedSequence; pass padded tensors."
        )
    layer, reverse = _rnn_position(pname)
    inputs, previous = rnn_layer_inputs(module, x, args[1] if len(args) > 1 else None, layer)
    cols = inputs if pname.startswith("weight_ih") else previous[1 if reverse else 0]
    return [cols.reshape(-1, cols.shape[-1])], ("hidden", id(target))


def _rnn_position(param_name: str) -> tuple[int, bool]:
    """``weight_hh_l2_reverse`` → (2, True)."""
    tail = param_name.split("_l")[-1]
    return int(tail.split("_")[0]), tail.endswith("_reverse")


@torch.no_grad()
def rnn_layer_inputs(module: nn.RNNBase, x: torch.Tensor, hx, layer: int):
    """Layer ``layer`` of a padded multi-layer RNN: its input sequence ``(T, N, in)`` and, per
    direction, the hidden state each step reads ``(T, N, H)`` (``h_{t−1}`` forwards, ``h_{t+1}``
    for the reverse direction) — recomputed one layer at a time from the module's own weights,
    since the module exposes only the last layer's outputs. Eval-mode semantics (no dropout
    between layers)."""
    directions = 2 if module.bidirectional else 1
    batched = x.dim() == 3
    seq = x if not batched else (x.transpose(0, 1) if module.batch_first else x)
    if not batched:
        seq = seq.unsqueeze(1)
    if hx is not None:
        hx = tuple(h if batched else h.unsqueeze(1) for h in (hx if isinstance(hx, tuple) else (hx,)))
    extra = {"nonlinearity": module.nonlinearity} if isinstance(module, nn.RNN) else {}
    for index in range(layer + 1):
        # type(module) is an RNN, LSTM or GRU, whose constructors take input_size first (RNNBase's takes mode)
        twin = type(module)(
            seq.shape[-1],  # type: ignore[arg-type]
            module.hidden_size,
            1,
            bias=module.bias,
            bidirectional=module.bidirectional,
            device="meta",
            **extra,
        )
        weights = {n: getattr(module, n.replace("_l0", f"_l{index}")) for n in twin._flat_weights_names}
        start = None if hx is None else tuple(h[index * directions : (index + 1) * directions] for h in hx)
        if start is not None and not isinstance(module, nn.LSTM):
            start = start[0]
        out, _ = torch.func.functional_call(twin, weights, (seq, start))
        if index == layer:
            H = module.hidden_size
            h0 = (
                torch.zeros_like(out[:1, :, :H]).expand(directions, -1, -1)
                if hx is None
                else hx[0][index * directions : (index + 1) * directions]
            )
            previous = [torch.cat([h0[0:1], out[:-1, :, :H]], dim=0)]
            if directions == 2:
                previous.append(torch.cat([out[1:, :, H:], h0[1:2]], dim=0))
            return seq, previous
        seq = out
    raise AssertionError("unreachable")


def hook_site(target: Target, parents: dict) -> nn.Module:
    """The module whose call carries ``target``'s inputs."""
    return parents.get(id(target.module), target.module) if target.layout == "linear" else target.module


def columns(target: Target, parents: dict, site: nn.Module, args, kwargs, output):
    """One call's input columns of ``target``: a tensor ``(groups, n, d)`` or a list of
    ``(n_g, d)`` (one per row block), and a key: targets whose keys match on every batch read
    the same tensor (their Hessians can be collected in one pass)."""
    layout, name = target.layout, target.name
    if isinstance(site, nn.MultiheadAttention):
        return _attention_columns(target, site, _bind_attention(site, args, kwargs), output, name)
    x = args[0] if args else next(iter(kwargs.values()))
    if layout == "recurrent":
        return _recurrent_columns(target, args, output, name)
    key = _key(x)
    if layout == "conv":
        return conv_columns(cast("nn.Conv1d | nn.Conv2d | nn.Conv3d", site), x.detach()), key  # a conv's own site
    return [x.detach().reshape(-1, x.shape[-1])], key


def _key(x: torch.Tensor):
    """Identifies the tensor a layer read, without keeping it alive (a freed tensor's id may be
    reused; its weak reference then no longer matches)."""
    return (weakref.ref(x), x._version)


def same_input(a, b) -> bool:
    if not (
        isinstance(a, tuple)
        and isinstance(b, tuple)
        and isinstance(a[0], weakref.ref)
        and isinstance(b[0], weakref.ref)
    ):
        return False
    x = a[0]()
    return x is not None and x is b[0]() and a[1] == b[1]


def input_key(target: Target, site: nn.Module, args, kwargs):
    """What :func:`columns` would give as key, without computing the columns."""
    if isinstance(site, nn.MultiheadAttention):
        if target.module is not site:
            return ("context", id(target))
        call = _bind_attention(site, args, kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        if target.param_name != "in_proj_weight":
            return _key({"q_proj_weight": q, "k_proj_weight": k, "v_proj_weight": v}[target.param_name])
        return _key(q) if (q is k and k is v) else ("qkv", id(target))
    x = args[0] if args else next(iter(kwargs.values()))
    if target.layout == "recurrent":
        if target.param_name not in ("weight_ih_l0", "weight_ih_l0_reverse"):
            return ("hidden", id(target))
        return _key(x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x)
    return _key(x)


def weight_matrix(target: Target) -> torch.Tensor:
    """W as ``(out, d)``: a conv kernel flattened like ``unfold``'s columns, HF Conv1D transposed."""
    return target.matrix()


def _column_kind(target: Target):
    """Targets of one kind that read the same tensor have the same input columns (and one XᵀX):
    Linear and HF Conv1D (the input's rows), a conv with the same geometry. None: not shared."""
    if target.layout in ("linear", "transposed"):
        return ("rows",)
    if target.layout == "conv":
        m = target.module
        return ("conv", type(m), m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
    return None


def _products(cols) -> tuple[list, list]:
    """A call's input columns as a list of ``(n_g, d)`` parts and each part's ``XᵀX`` (float32
    products, returned in float64); conv groups in one batched product."""
    parts = [cols[0]] if len(cols) == 1 else list(cols)
    if len(parts) > 1 and isinstance(cols, torch.Tensor):
        c = cols.float()
        return parts, list(torch.bmm(c.transpose(1, 2), c).double())
    products = []
    for x in parts:
        x = x.float()
        products.append((x.T @ x).double())
    return parts, products


class InputHooks:
    """While entered, a forward hook on each of ``self.targets``' hook sites (``self.parents``:
    :func:`attention_parents`); a subclass gives ``_hook_for(target, site)``."""

    _handles: list

    def __enter__(self):
        self._handles = []
        for target in self.targets:
            site = hook_site(target, self.parents)
            self._handles.append(site.register_forward_hook(self._hook_for(target, site), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Accumulator(InputHooks):
    """Forward hooks that sum ``X̃ᵀX̃`` for a set of targets over whatever forwards run while
    attached (a whole model, or one block on cached inputs). ``end_batch()`` after each batch
    records which targets read the very same tensor, for :meth:`shared_input`."""

    def __init__(self, targets: Sequence[Target], parents: dict, *, with_bias: bool = True):
        self.targets, self.parents, self.with_bias = list(targets), parents, with_bias
        self.stats: dict[str, LayerHessian] = {}
        self.calls = {t.name: 0 for t in self.targets}
        self._keys: dict[str, object] = {}
        self._firsts: dict[str, str] = {}
        self.signatures: dict[str, list] = {t.name: [] for t in self.targets}
        self._handles = []
        self.seconds = 0.0
        self._last = None  # (first reader, column kind, parts, XᵀX per part) of the latest input

    def __enter__(self):
        self._started = time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.seconds += time.perf_counter() - self._started

    def _hook_for(self, target: Target, site: nn.Module):
        bias = self.with_bias and target.bias is not None
        kind = _column_kind(target)

        def hook(module, args, kwargs, output):
            key = input_key(target, site, args, kwargs)
            # compared now, while the tensor is alive (a freed tensor's weak reference is dead)
            first = next((name for name, other in self._keys.items() if same_input(other, key)), target.name)
            last = self._last
            if kind is not None and last is not None and last[0] == first and last[1] == kind:
                parts, products = last[2], last[3]  # q/k/v, gate/up: one XᵀX for all readers
            else:
                cols, _ = columns(target, self.parents, site, args, kwargs, output)
                parts, products = _products(cols)
                self._last = (target.name, kind, parts, products) if kind is not None else None
            self._add(target, parts, products, bias)
            self.calls[target.name] += 1
            self._firsts[target.name] = first
            self._keys[target.name] = key

        return hook

    def _add(self, target: Target, parts: list, products: list, bias: bool) -> None:
        d = parts[0].shape[1]
        entry = self.stats.get(target.name)
        if entry is None:
            size = d + 1 if bias else d
            shape = (size, size) if len(parts) == 1 else (len(parts), size, size)
            entry = self.stats[target.name] = LayerHessian(
                target.name, torch.zeros(shape, dtype=torch.float64), 0, bias, group_n=[0] * len(parts)
            )
        blocks = [entry.xtx] if len(parts) == 1 else list(entry.xtx)
        for g, (x, product, block) in enumerate(zip(parts, products, blocks)):
            block[:d, :d] += product
            if bias:
                sums = x.float().sum(dim=0, dtype=torch.float64)
                block[:d, d] += sums
                block[d, :d] += sums
                block[d, d] += len(x)
            entry.group_n[g] += len(x)
        entry.n = entry.group_n[0]

    def end_batch(self) -> None:
        """Note, for this batch, the first target that read each target's input tensor."""
        for target in self.targets:
            name = target.name
            self.signatures[name].append(self._firsts.get(name) if self.calls[name] == 1 else None)
            self.calls[name] = 0
        self._keys, self._firsts, self._last = {}, {}, None

    def shared_input(self, name: str) -> list[str]:
        """The targets that read the same tensor as ``name`` on every batch (itself first)."""
        sig = self.signatures[name]
        if not sig or any(s is None for s in sig):
            return [name]
        return [t.name for t in self.targets if self.signatures[t.name] == sig]

    def result(self) -> dict[str, LayerHessian]:
        missing = [t.name for t in self.targets if t.name not in self.stats]
        if missing:
            raise ValueError(f"L-OBS: the calibration forward never reached {', '.join(missing)}.")
        for entry in self.stats.values():
            entry.seconds = self.seconds / max(len(self.stats), 1)
        return self.stats


def calibration_mode(model: nn.Module):
    """During calibration forwards: MultiheadAttention's fused fast path off (it bypasses the
    modules that the hooks watch) and Hugging Face key/value caches off (a re-run block must
    not find the keys of an earlier run)."""
    return _CalibrationMode(model)


class _CalibrationMode:
    def __init__(self, model):
        self.configs = [
            m.config for m in model.modules() if getattr(getattr(m, "config", None), "use_cache", None) is not None
        ]

    def __enter__(self):
        self.fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self.caches = [c.use_cache for c in self.configs]
        for c in self.configs:
            c.use_cache = False
        return self

    def __exit__(self, *exc):
        torch.backends.mha.set_fastpath_enabled(self.fastpath)
        for c, value in zip(self.configs, self.caches):
            c.use_cache = value


def collect(
    model: nn.Module, targets: Sequence[Target], batches: Iterable, *, with_bias: bool = True
) -> dict[str, LayerHessian]:
    """Run ``batches`` through ``model`` (eval mode, no grad) and accumulate each target's
    input Hessian. One pass for all the given targets (pass one target at a time to bound
    memory by one layer)."""
    parents = attention_parents(model)
    for target in targets:
        check_target(target, parents=parents)
    accumulator = Accumulator(targets, parents, with_bias=with_bias)
    with calibration_mode(model), accumulator:
        for batch in batches:
            forward_batches(model, [batch])
            accumulator.end_batch()
    return accumulator.result()


def prepare(h: LayerHessian, W: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped Hessian, the weight matrix with dead inputs zeroed, and the dead-input mask.

    A *dead* input (``H_jj = 0``: always zero on the calibration data) cannot change the
    output: its weights are zeroed (pruned first, at no cost) and ``H_jj`` set to 1 so H is
    invertible (as SparseGPT does). Damping adds ``λ · mean(diag H)`` to the diagonal."""
    H = h.H  # a new tensor: xtx / n
    dead = torch.diagonal(H) == 0
    W = W.clone()
    W[:, dead] = 0
    H[dead, dead] = 1.0
    diag = torch.diagonal(H)
    diag += damping * diag.mean()
    return H, W, dead
