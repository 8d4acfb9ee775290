"""Hugging Face round trip: save a pruned or thinned ``transformers`` model so that it loads back.

:func:`save_pretrained` writes a directory that ``transformers`` reads with its own classes::

    prunelab.save_pretrained(model, "out/")                 # config.json + model.safetensors
    AutoModelForCausalLM.from_pretrained("out/")           # identical outputs

* **Pruned (masked) models** keep their shapes: prunelab's masks are already zeros in the weights,
  and the zeros are stored (a ``torch.nn.utils.prune`` reparametrisation, ``weight_orig`` ×
  ``weight_mask``, is folded into ``weight`` first). The config is the model's own.
* **Thinned models** (:func:`prunelab.units.thin`: attention heads, MLP channels, whole blocks
  removed) get an updated config — ``num_hidden_layers``, ``num_attention_heads``,
  ``num_key_value_heads``, ``intermediate_size`` (GPT-2: ``n_inner``) — with ``head_dim`` written
  explicitly where the config has one, since the head width stays while the head count falls.
  The config also says whether the output embedding is tied to the input embedding (as it is in
  the model), so a tied ``lm_head`` is stored once and tied again on reload.

A stock config describes one width per kind for every layer. Before writing, the updated config is
checked by building the model from it on the ``meta`` device (no memory) and comparing every
tensor's name and shape with the model's. When they differ — *non-uniform* thinning (layers of
different widths), or a config that cannot describe the thinned shapes (GPT-2's, BERT's and ViT's
configs have no ``head_dim``: their heads are ``hidden_size / num_attention_heads`` wide, so a
model with fewer heads of the same width has no stock config) — a prunelab model file
(:func:`prunelab.export.save`, ``model.plm``) is written in the directory instead, with the
model's config (at its depth) inside it, and a :class:`NotStockWarning` says why.
``prunelab.load(directory)`` rebuilds either kind (``fallback=False`` makes the non-stock case a
ValueError instead). A model that not even its own config can rebuild (a block replaced by a module
of another kind) is refused, pointing to :func:`prunelab.save` with ``load(path, model=...)``.

``transformers`` is imported only when these functions run: prunelab imports without it.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from prunelab._validation import MODEL, PATH, check_type, validate_params
from prunelab.export import load_directory, save
from prunelab.hf_load import (
    CONFIG_NAME,
    GENERATION_NAME,
    PLM_NAME,
    WEIGHTS_NAME,  # noqa: F401
    import_transformers,
)

if TYPE_CHECKING:  # annotations only: transformers is imported when the functions run
    from transformers import PretrainedConfig

#: Config entries of the MLP width, in the order they are looked for.
INTERMEDIATE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")


class NotStockWarning(UserWarning):
    """The model's shapes fit no stock config: a prunelab model file was written instead."""


@dataclass(frozen=True)
class SavedPretrained:
    """What :func:`save_pretrained` wrote: ``format`` is ``"huggingface"`` (config.json +
    model.safetensors) or ``"prunelab"`` (model.plm, with ``reasons`` why)."""

    directory: Path
    format: str
    files: list[str]
    config_changes: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


def _check_model(model, where: str) -> None:
    transformers = import_transformers(where)
    check_type("model", model, nn.Module, where=where)
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"the 'model' parameter of {where} must be a transformers PreTrainedModel (with a "
            f"config). Got {type(model).__name__} instead; save other models with prunelab.save."
        )


# --------------------------------------------------------------------------- the state to store
def folded_state(model: nn.Module, where: str = "save_pretrained") -> dict[str, torch.Tensor]:
    """The model's state dict with ``torch.nn.utils.prune`` masks folded into the weights
    (``name_orig`` × ``name_mask`` → ``name``); a ``torch.nn.utils.parametrize`` parametrisation
    is refused (its stored tensors are not the weights)."""
    state = model.state_dict()
    parametrized = sorted(k for k in state if ".parametrizations." in k)
    if parametrized:
        raise ValueError(
            f"{where}: {parametrized[0]} belongs to a torch.nn.utils.parametrize parametrisation; "
            f"make it permanent first (torch.nn.utils.parametrize.remove_parametrizations)."
        )
    out = {}
    for key, tensor in state.items():
        if key.endswith("_mask") and f"{key[:-5]}_orig" in state:
            continue
        if key.endswith("_orig") and f"{key[:-5]}_mask" in state:
            out[key[:-5]] = (tensor * state[f"{key[:-5]}_mask"]).detach()
        else:
            out[key] = tensor.detach()
    return out


# --------------------------------------------------------------------------- the config
def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's stack of blocks: the ModuleList holding the most parameters."""
    best, size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = (name, module), n
    return best


def _widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per kind (``heads``, ``kv_heads``, ``mlp``, ``head_dim``): ``{module: width}`` of every
    attention and MLP that :mod:`prunelab.units.attention` recognises."""
    from prunelab.units.attention import find

    groups, _ = find(model)
    found: dict[str, dict[str, int]] = {"heads": {}, "kv_heads": {}, "mlp": {}, "head_dim": {}}
    for group in groups:
        if group.kind == "dense":
            found["mlp"][group.name] = group.n_units
        elif group.kind == "heads":
            owner = group.owner
            per_kv = getattr(owner, "num_key_value_groups", 1)
            found["heads"][group.name] = group.n_units
            found["kv_heads"][group.name] = (
                group.n_units // per_kv if isinstance(per_kv, int) and per_kv else group.n_units
            )
            head_dim = getattr(owner, "head_dim", None) or getattr(owner, "attention_head_size", None)
            if isinstance(head_dim, int):
                found["head_dim"][group.name] = head_dim
    return found


def _has(config, key: str) -> bool:
    return key in config.to_dict() or key in getattr(config, "attribute_map", {})


def _set(config, key: str, value, changes: dict) -> None:
    if getattr(config, key, None) != value:
        changes[key] = value
    setattr(config, key, value)


def _one(kind: str, values: dict[str, int], problems: list[str]) -> int | None:
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        shown = list(values.items())
        listed = ", ".join(f"{name} {width}" for name, width in shown[:4]) + (
            f", … ({len(shown)} in all)" if len(shown) > 4 else ""
        )
        problems.append(
            f"non-uniform thinning: the layers have different {kind} ({listed}); a stock config "
            f"gives every layer the same"
        )
        return None
    return distinct[0] if distinct else None


def stock_config(model: nn.Module) -> tuple[object, dict, list[str]]:
    """A copy of the model's config updated to its (thinned) shapes, the entries changed, and the
    problems that stop a stock config from describing the model (empty when it does)."""
    config = copy.deepcopy(cast("PretrainedConfig", model.config))
    changes: dict = {}
    problems: list[str] = []
    stack = _block_list(model)
    if stack is not None and _has(config, "num_hidden_layers"):
        name, blocks = stack
        kinds = sorted({type(b).__name__ for b in blocks})
        if len(kinds) > 1:
            problems.append(
                f"{name} holds blocks of different kinds ({', '.join(kinds)}); a stock config builds every layer alike"
            )
        before = config.num_hidden_layers
        if len(blocks) != before:
            _set(config, "num_hidden_layers", len(blocks), changes)
            _per_layer_entries(config, before, len(blocks), changes, problems)
    widths = _widths(model)
    heads = _one("numbers of attention heads", widths["heads"], problems)
    kv = _one("numbers of key/value heads", widths["kv_heads"], problems)
    mlp = _one("MLP widths", widths["mlp"], problems)
    head_dim = _one("head widths", widths["head_dim"], problems)
    if heads is not None and _has(config, "num_attention_heads"):
        _set(config, "num_attention_heads", heads, changes)
        if _has(config, "num_key_value_heads"):
            _set(config, "num_key_value_heads", kv, changes)
        if _has(config, "head_dim") and head_dim is not None:
            _set(config, "head_dim", head_dim, changes)
    if mlp is not None:
        key = next((k for k in INTERMEDIATE_KEYS if _has(config, k)), None)
        if key is not None:
            _set(config, key, mlp, changes)
    _tie(model, config, changes)
    dtype = next((p.dtype for p in model.parameters()), None)
    if dtype is not None and hasattr(config, "dtype"):
        config.dtype = dtype
    return config, changes, problems


def _per_layer_entries(config, before: int, after: int, changes: dict, problems: list[str]) -> None:
    """Config lists with one entry per layer (e.g. ``layer_types``) follow a change of depth when
    all their entries are equal; otherwise the config cannot say which layers were removed."""
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == before and key not in ("architectures",):
            if len({json.dumps(v, sort_keys=True, default=str) for v in value}) == 1:
                _set(config, key, value[:after], changes)
            else:
                problems.append(
                    f"the config's per-layer entry {key!r} differs between layers, and the model has "
                    f"{after} of its {before} layers left; a stock config cannot say which were removed"
                )


def _tie(model, config, changes: dict) -> None:
    """``tie_word_embeddings`` as the model is: tied when its output embedding is its input's
    (left as it is for a model without an output embedding, e.g. a classifier)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if not hasattr(config, "tie_word_embeddings") or out is None or inp is None:
        return
    _set(config, "tie_word_embeddings", out.weight is inp.weight, changes)


def _tie_targets(model) -> set[str]:
    """State-dict keys that ``transformers`` ties to another tensor on load (stored once)."""
    keys = getattr(model, "_tied_weights_keys", None) or ()
    return set(keys.keys() if isinstance(keys, dict) else keys)


def mismatches(model: nn.Module, config, state: dict[str, torch.Tensor], changes: dict) -> list[str]:
    """How the model built from ``config`` (on the meta device: no memory) differs from ``state``,
    tensor by tensor (empty when every name and shape agrees); ``changes``: the config entries
    updated (to explain a head count that a config without ``head_dim`` cannot carry)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = type(model)(config).state_dict()
    except Exception as err:  # noqa: BLE001 - any failure means: not a stock config
        return [f"the updated config cannot build a {type(model).__name__} ({type(err).__name__}: {err})"]
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    out = [f"{k}: in the stock model, not in this one" for k in missing]
    out += [f"{k}: in this model, not in the stock one" for k in extra]
    out += [
        f"{k} has shape {tuple(state[k].shape)}, but the stock config gives {tuple(reference[k].shape)}"
        for k in reference
        if k in state and tuple(state[k].shape) != tuple(reference[k].shape)
    ]
    if len(out) > 2:
        out = [*out[:2], f"{len(out) - 2} more tensors differ"]
    if out and not _has(config, "head_dim") and "num_attention_heads" in changes:
        out.insert(
            0,
            f"{type(config).__name__} has no head_dim: its heads are hidden_size / num_attention_heads "
            f"wide, so fewer heads of the same width cannot be described",
        )
    return out


# --------------------------------------------------------------------------- saving
@validate_params({"model": [MODEL], "directory": [PATH], "fallback": [bool]})
def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, fallback: bool = True) -> SavedPretrained:
    """Save a pruned or thinned ``transformers`` model in ``directory`` so that its class's
    ``from_pretrained`` (e.g. ``AutoModelForCausalLM``) loads it with identical outputs.

    When the model's shapes fit a stock config (see the module docstring) the directory gets
    ``config.json`` (updated to the thinned sizes), ``model.safetensors`` (zeros of pruned weights
    stored) and, for generative models, ``generation_config.json``. Otherwise, with ``fallback``
    (the default), a prunelab model file ``model.plm`` is written instead and a
    :class:`NotStockWarning` names the reason; ``prunelab.load(directory)`` rebuilds that model.
    With ``fallback=False`` that case is a ValueError and nothing is written. Files of the other
    format left in the directory by an earlier save are removed, so the directory holds one model.
    """
    where = "save_pretrained"
    _check_model(model, where)
    from prunelab._model_checks import check_materialised

    check_materialised(model, where)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"the 'directory' parameter of {where} is a file ({str(directory)!r}); give a directory.")
    from prunelab.sparse import SparseLinear, densify

    if any(isinstance(m, SparseLinear) for m in model.modules()):
        model = densify(model)
    state = folded_state(model, where)
    config, changes, problems = stock_config(model)
    if not problems:
        problems = mismatches(model, config, state, changes)
    if problems and not fallback:
        raise ValueError(
            f"{where}: {type(model).__name__} cannot be described by a stock "
            f"{type(model.config).__name__}: {'; '.join(problems)}. Save it with fallback=True (a "
            f"prunelab model file that prunelab.load rebuilds) or thin every layer alike."
        )
    if problems:
        template = _template_config(model, changes, state, where)
        directory.mkdir(parents=True, exist_ok=True)
        return _save_prunelab(model, template, directory, problems)
    directory.mkdir(parents=True, exist_ok=True)
    return _save_stock(model, config, state, directory, changes)


def _template_config(model, changes: dict, state: dict[str, torch.Tensor], where: str):
    """The config of the full-width model that ``prunelab.load`` resizes to the saved shapes: the
    model's own, at its depth (blocks removed). A ValueError, before anything is written, when even
    that model does not hold every saved tensor at a size at least as large."""
    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        if key == "num_hidden_layers" or isinstance(value, list):
            setattr(config, key, value)
    problem: str | None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = type(model)(config).state_dict()
    except Exception as err:  # noqa: BLE001 - reported with the alternative below
        reference, problem = None, f"its config cannot build a {type(model).__name__} ({type(err).__name__}: {err})"
    if reference is not None:
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        larger = [
            k
            for k in state
            if k in reference
            and (state[k].dim() != reference[k].dim() or any(a > b for a, b in zip(state[k].shape, reference[k].shape)))
        ]
        problem = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {extra[:3]}"
            if extra
            else f"larger than the config's: {larger[:3]}"
            if larger
            else None
        )
    if problem is not None:
        raise ValueError(
            f"{where}: {type(model).__name__} fits neither a stock config nor a prunelab model file "
            f"rebuilt from its config (its tensors do not match the {type(model.config).__name__}'s "
            f"layout: {problem}); save it with prunelab.save(model, 'model.plm') and load it with "
            f"prunelab.load('model.plm', model=...) into a module of the same structure."
        )
    return config


def _save_stock(model, config, state: dict, directory: Path, changes: dict) -> SavedPretrained:
    from safetensors.torch import save_file

    tied = _tie_targets(model) if getattr(config, "tie_word_embeddings", False) else set()
    stored = {}
    for key, tensor in state.items():
        if key in tied:
            continue
        stored[key] = tensor.detach().to("cpu").contiguous().clone()  # no shared storage in safetensors
    config.architectures = [type(model).__name__]
    _remove(directory, [PLM_NAME])
    save_file(stored, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(directory))
    files = [CONFIG_NAME, WEIGHTS_NAME]
    generation = getattr(model, "generation_config", None)
    if generation is not None and model.can_generate():
        generation.save_pretrained(str(directory))
        files.append(GENERATION_NAME)
    return SavedPretrained(directory, "huggingface", files, changes)


def _save_prunelab(model, config, directory: Path, problems: list[str]) -> SavedPretrained:
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    meta = {
        "huggingface": {
            "class": type(model).__name__,
            "config_class": type(config).__name__,
            "config": json.loads(config.to_json_string(use_diff=False)),
            "dtype": str(dtype).removeprefix("torch."),
        }
    }
    _remove(directory, [CONFIG_NAME, WEIGHTS_NAME, GENERATION_NAME])
    if any(t.dtype == torch.bfloat16 for t in model.state_dict().values()):
        model = copy.deepcopy(model).float()  # a model file holds no bfloat16; float32 keeps it exactly
    save(model, directory / PLM_NAME, metadata=meta)
    warnings.warn(
        f"save_pretrained: {type(model).__name__} cannot be described by a stock "
        f"{type(config).__name__} ({'; '.join(problems)}), so {directory / PLM_NAME} (a prunelab model "
        f"file) was written instead of config.json + model.safetensors. Load it with "
        f"prunelab.load({str(directory)!r}); transformers' from_pretrained cannot read it.",
        NotStockWarning,
        stacklevel=4,
    )  # past save_pretrained and its declaration check
    return SavedPretrained(directory, "prunelab", [PLM_NAME], {}, problems)


def _remove(directory: Path, names: list[str]) -> None:
    for name in names:
        (directory / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- loading
@validate_params({"directory": [PATH], "model": [MODEL, None]})
def load_pretrained(directory: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """The model saved by :func:`save_pretrained` in ``directory``, in eval mode: a prunelab model
    file (``model.plm``) rebuilt from the Hugging Face config inside it (or into ``model``), or a
    stock directory loaded by its class's ``from_pretrained`` (:func:`prunelab.export.load_directory`,
    which ``prunelab.load`` of a directory runs too)."""
    return load_directory(directory, model=model)
