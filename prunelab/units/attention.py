"""Unit groups of transformer blocks: MLP neurons and attention heads, recognised by structure.

* **MLP neurons**: the hidden units between an MLP's up and down projections —
  ``nn.TransformerEncoderLayer``/``DecoderLayer`` (``linear1``/``linear2``), ``fc1``/``fc2``
  (ViT), ``c_fc``/``c_proj`` (GPT-2's ``Conv1D``), BERT's ``intermediate.dense``/``output.dense``,
  and gated MLPs (``gate_proj`` and ``up_proj`` rows together, ``down_proj`` columns; LLaMA).
* **Attention heads**: a head's q, k and v rows and its columns of the output projection, for
  attention with ``q_proj/k_proj/v_proj/o_proj`` (LLaMA, ViT), ``query/key/value`` with the
  parent's ``output.dense`` (BERT), or a packed ``c_attn`` (GPT-2). With grouped-query attention
  (fewer key/value heads than query heads) the group ``<attention>:heads`` removes query heads
  evenly within each key/value group (their shared k/v rows stay), and ``<attention>:kv_heads``
  (only when named) removes whole key/value heads with all their query heads. The thinned
  attention gets its new head counts (``num_heads``/``num_attention_heads``/``split_size``/
  ``num_key_value_groups``); the head size and the softmax scale are unchanged.

Masked removal zeroes the units' producing rows (and biases) and, for heads, their output-projection
columns, so a removed head adds exactly 0. Refused, with the reason: ``nn.MultiheadAttention``'s
heads (it requires ``num_heads · head_dim == embed_dim``, so a head cannot go without changing the
model's width), and the hidden size (the residual stream through LayerNorm/RMSNorm: a norm over all
hidden channels changes for the rest when some are removed, so no thinned model equals the masked
one).
"""

from __future__ import annotations

from typing import TypeGuard, cast

import torch
from torch import nn

from prunelab.units.groups import Axis, Point, UnitGroup, is_hf_conv1d

MLP_PAIRS = (("linear1", "linear2"), ("fc1", "fc2"), ("c_fc", "c_proj"))


def _linear_like(module) -> TypeGuard[nn.Module]:
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def _out_axis(module) -> int:
    return 1 if is_hf_conv1d(module) else 0


def _producer(module, index) -> list[Axis]:
    return [Axis(module, "weight", _out_axis(module), index), Axis(module, "bias", 0, index)]


def _mlp(name: str, module: nn.Module) -> UnitGroup | None:
    ups: list[nn.Module] | None = None
    down: nn.Module | None = None
    for up_name, down_name in MLP_PAIRS:
        up, dn = getattr(module, up_name, None), getattr(module, down_name, None)
        if _linear_like(up) and _linear_like(dn) and type(up) is type(dn):
            ups, down = [up], dn
    gate, up, dn = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if isinstance(gate, nn.Linear) and isinstance(up, nn.Linear) and isinstance(dn, nn.Linear):
        ups, down = [gate, up], dn
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    inter_dense, out_dense = getattr(inter, "dense", None), getattr(out, "dense", None)
    if (
        isinstance(inter_dense, nn.Linear)
        and isinstance(out_dense, nn.Linear)
        and getattr(module, "attention", None) is not None
    ):
        ups, down = [inter_dense], out_dense
    if ups is None or down is None:  # (set together)
        return None
    n = cast(torch.Tensor, ups[0].weight).shape[_out_axis(ups[0])]
    index = torch.arange(n).view(n, 1)
    producers = [a for u in ups for a in _producer(u, index)]
    consumer = Axis(down, "weight", 0 if is_hf_conv1d(down) else 1, index)
    label = name if name.split(".")[-1] == "mlp" else f"{name}:mlp"
    return UnitGroup(
        label,
        "dense",
        n,
        zero=producers,
        points=[Point(down, "", -1, index)],
        rows=[a for a in producers if a.name == "weight"],
        cuts=[*producers, consumer],
        module=ups[0],
    )


def _head_index(n_heads: int, head_dim: int, offset: int = 0) -> torch.Tensor:
    return offset + torch.arange(n_heads * head_dim).view(n_heads, head_dim)


def _set_heads(owner: nn.Module, n_heads: int, n_kv: int) -> None:
    for attr in ("num_heads", "num_attention_heads", "n_head"):
        if isinstance(getattr(owner, attr, None), int):
            setattr(owner, attr, n_heads)
    # every attention module found (see _attention) has one of the two
    head_dim = cast(int, getattr(owner, "head_dim", None) or getattr(owner, "attention_head_size", None))
    # (the ignores: torch types Module.__setattr__ for tensors and modules only; plain attributes are allowed)
    if isinstance(getattr(owner, "all_head_size", None), int):
        owner.all_head_size = n_heads * head_dim  # type: ignore[assignment]
    if isinstance(getattr(owner, "split_size", None), int):
        owner.split_size = n_heads * head_dim  # type: ignore[assignment]
    if isinstance(getattr(owner, "num_key_value_groups", None), int):
        owner.num_key_value_groups = n_heads // n_kv  # type: ignore[assignment]
    if isinstance(getattr(owner, "num_key_value_heads", None), int):
        owner.num_key_value_heads = n_kv  # type: ignore[assignment]


def _resize_heads(n_heads: int, n_kv: int, kind: str):
    per_kv = n_heads // n_kv

    def resize(owner, kept_units):
        k = len(kept_units)
        if kind == "kv_heads":
            _set_heads(owner, k * per_kv, k)
        elif n_kv == n_heads:
            _set_heads(owner, k, k)
        else:
            blocks = kept_units // per_kv
            counts = torch.bincount(blocks, minlength=n_kv)
            if not bool((counts == counts[0]).all()):
                raise ValueError(
                    "grouped-query attention keeps the same number of query heads in every key/value "
                    f"group; the plan keeps {counts.tolist()}."
                )
            _set_heads(owner, k, n_kv)

    return resize


def _attention(name: str, module: nn.Module, parent: nn.Module | None) -> list[UnitGroup]:
    """Head groups of one attention module (empty when it is not one)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in names) and isinstance(
        getattr(module, "head_dim", None), int
    ):
        q, k, v, o = (getattr(module, n) for n in names)
        return _heads(name, module, [q], [k, v], o, module.head_dim, separate=True)
    parent_dense = getattr(getattr(parent, "output", None), "dense", None)
    if (
        all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value"))
        and isinstance(getattr(module, "attention_head_size", None), int)
        and parent is not None
        and isinstance(parent_dense, nn.Linear)
    ):
        return _heads(
            name,
            module,
            [module.query],
            [module.key, module.value],
            parent_dense,
            module.attention_head_size,
            separate=True,
        )
    if (
        is_hf_conv1d(getattr(module, "c_attn", None))
        and is_hf_conv1d(getattr(module, "c_proj", None))
        and isinstance(getattr(module, "split_size", None), int)
        and not hasattr(module, "q_attn")
    ):
        return _heads(name, module, [module.c_attn], [], module.c_proj, module.head_dim, separate=False)
    return []


def _heads(name, owner, qs, kvs, o, head_dim, separate) -> list[UnitGroup]:
    q = qs[0]
    n_heads = q.weight.shape[_out_axis(q)] // head_dim if separate else owner.split_size // head_dim
    n_kv = kvs[0].weight.shape[0] // head_dim if kvs else n_heads
    o_axis = 0 if is_hf_conv1d(o) else 1
    q_index = _head_index(n_heads, head_dim)
    if not separate:  # GPT-2's c_attn: q, k and v blocks of one tensor
        E = n_heads * head_dim
        q_index = torch.cat([q_index, q_index + E, q_index + 2 * E], dim=1)
    producers = [a for m in qs for a in _producer(m, q_index)]
    if n_kv == n_heads:
        producers += [a for m in kvs for a in _producer(m, q_index)]
    o_cols = Axis(o, "weight", o_axis, _head_index(n_heads, head_dim))
    heads = UnitGroup(
        f"{name}:heads",
        "heads",
        n_heads,
        zero=[*producers, o_cols],
        points=[Point(o, "", -1, _head_index(n_heads, head_dim))],
        rows=[a for a in producers if a.name == "weight"],
        cuts=[*producers, o_cols],
        module=q,
        owner=owner,
        resize=_resize_heads(n_heads, n_kv, "heads"),
    )
    if n_kv == n_heads:
        return [heads]
    per_kv = n_heads // n_kv
    heads.blocks = torch.arange(n_heads) // per_kv
    kv_index = _head_index(n_kv, head_dim)
    q_of_kv = _head_index(n_heads, head_dim).view(n_kv, per_kv * head_dim)
    kv_prod = [a for m in qs for a in _producer(m, q_of_kv)] + [a for m in kvs for a in _producer(m, kv_index)]
    kv_o = Axis(o, "weight", o_axis, q_of_kv)
    kv_heads = UnitGroup(
        f"{name}:kv_heads",
        "kv_heads",
        n_kv,
        zero=[*kv_prod, kv_o],
        points=[Point(o, "", -1, q_of_kv)],
        rows=[a for a in kv_prod if a.name == "weight"],
        cuts=[*kv_prod, kv_o],
        module=kvs[0],
        owner=owner,
        resize=_resize_heads(n_heads, n_kv, "kv_heads"),
    )
    return [heads, kv_heads]


def find(model: nn.Module) -> tuple[list[UnitGroup], dict[str, str]]:
    """MLP and attention-head groups of a transformer, and what is refused with the reason."""
    groups, refused = [], {}
    parents = {}
    for parent in model.modules():
        for child in parent.children():
            parents[child] = parent
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            refused[f"{name}:heads"] = (
                "nn.MultiheadAttention requires num_heads × head_dim == embed_dim, so a head "
                "cannot be removed without changing the model's width"
            )
            continue
        mlp = _mlp(name, module)
        if mlp is not None:
            groups.append(mlp)
        groups += _attention(name, module, parents.get(module))
    for group in groups:
        group.members = sorted({_name(model, a.module) for a in group.cuts})
    return groups, refused


def _name(model, module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    return "?"
