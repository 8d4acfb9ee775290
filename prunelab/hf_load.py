"""Reading Hugging Face models back: the ``transformers`` classes that a prunelab model file or a
:func:`prunelab.hf.save_pretrained` directory names, built with transformers' own config and model
classes (nothing from the file is executed), and the names of the files in such a directory.

It lies below both :mod:`prunelab.export`, whose ``load`` reads a ``save_pretrained`` directory
and a model file with Hugging Face metadata through it, and :mod:`prunelab.hf`, which writes them
(with :func:`prunelab.export.save` for the prunelab-file fallback), so the two import one way.
``transformers`` is imported only when these functions run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from prunelab._files import ModelFileError

if TYPE_CHECKING:  # annotations only: transformers is imported when the functions run
    from transformers import PretrainedConfig

#: The files of a save_pretrained directory: a prunelab model file, or a stock checkpoint.
PLM_NAME = "model.plm"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_NAME = "generation_config.json"


def import_transformers(where: str):
    """The ``transformers`` package, imported now; an ImportError naming ``where`` without it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"{where} needs the 'transformers' package: pip install transformers") from None
    return transformers


def model_class(transformers, name, where: str):
    """The ``transformers`` model class called ``name``; anything else is a ModelFileError."""
    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelFileError(f"{where}: the model class {name!r} is not a transformers model class.")
    return cls


def load_stock(directory: Path, model: nn.Module | None, where: str) -> nn.Module:
    """The stock checkpoint (``config.json`` + weights) in ``directory``, loaded by its class's
    ``from_pretrained``, in eval mode; a ``model`` to load into is refused."""
    if model is not None:
        raise ValueError(
            f"{where}: the directory holds a stock Hugging Face checkpoint; load it with "
            f"from_pretrained (or prunelab.load without model=)."
        )
    transformers = import_transformers("prunelab.load of a Hugging Face directory")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    cls = model_class(transformers, (config.architectures or [None])[0], where)
    return cls.from_pretrained(str(directory)).eval()


def build_from_metadata(info, where: str) -> nn.Module:
    """The full-size model that a prunelab file's ``huggingface`` metadata names (its class and
    config), for :func:`prunelab.export.load` to resize and fill. Only transformers' own config
    and model classes are built; nothing from the file is executed."""
    transformers = import_transformers("prunelab.load of a Hugging Face model file")
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ModelFileError(f"{where}: the file's 'huggingface' metadata is malformed.")
    cls = model_class(transformers, info.get("class"), where)
    config_name = info.get("config_class")
    config_cls = (
        getattr(transformers, config_name, None)
        if isinstance(config_name, str) and config_name.isidentifier()
        else None
    )
    if not (isinstance(config_cls, type) and issubclass(config_cls, transformers.PretrainedConfig)):
        raise ModelFileError(f"{where}: the config class {config_name!r} is not a transformers config class.")
    try:
        config = cast("type[PretrainedConfig]", config_cls).from_dict(dict(info["config"]))
        model = cls(config)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelFileError(f"{where}: its Hugging Face config cannot build a {cls.__name__}: {err}") from None
    dtype = getattr(torch, str(info.get("dtype", "float32")), None)
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model
