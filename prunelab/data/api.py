"""Entry points: ``load_dataset``, ``fetch`` and ``dataset_info``, dispatched through ``DATASETS``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prunelab._validation import PATH, validate_params
from prunelab.data.catalog import DATASETS
from prunelab.data.dataset import Dataset
from prunelab.data.source import DatasetSource


def _source(name: Any, where: str) -> DatasetSource:
    return DATASETS.get(name, param="name", where=where)


#: What every function naming a dataset declares (the name itself is checked by the catalogue).
_NAMED = {"root": [PATH, None]}


@validate_params({**_NAMED, "download": [bool]})
def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool = False, **options: Any) -> Dataset:
    """Load dataset ``name`` (see ``DATASETS.names()``) fully into memory.

    ``root``: data root (default ``$PRUNELAB_DATA``, else the cache dir).
    ``download``: fetch missing files (verified by md5) instead of raising
    :class:`DatasetNotFoundError`. ``options`` are dataset-specific (e.g. ``seed``,
    ``swap`` for the MNIST variants); an unknown one raises ``TypeError``.
    """
    where = "load_dataset"
    source = _source(name, where)
    unknown = sorted(set(options) - set(source.options))
    if unknown:
        valid = ", ".join(source.options) if source.options else "none"
        raise TypeError(
            f"load_dataset() got an unexpected option {unknown[0]!r} for dataset "
            f"'{source.name}'; its valid options are: {valid} "
            f"(plus root and download for every dataset)"
        )
    return source.load(root=root, download=download, **options)


@validate_params(_NAMED)
def fetch(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Download (if missing) and verify the files of ``name``; return their paths.

    Nothing is loaded into memory. For the MNIST variants this fetches MNIST, the
    source they are generated from. ``digits`` needs no files and returns ``[]``.
    """
    where = "fetch"
    source = _source(name, where)
    return source.fetch(root)


@validate_params(_NAMED)
def dataset_info(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a CLI listing shows: description, expected files and where they go, shapes, sizes."""
    where = "dataset_info"
    source = _source(name, where)
    return source.info(root)
