"""``load_text``: a language-modelling dataset from your own train/valid/test text files.

>>> ds = load_text("my_corpus/", vocab_size=4096, seq_len=256)   # my_corpus/{train,valid,test}.txt
>>> ds = load_text({"train": "a.txt", "valid": "b.txt", "test": "c.txt"}, name="mine")

The files are tokenized, cut and cached exactly like the named text datasets
(:mod:`prunelab.data.text`). Having no published checksums, they are identified by their sha256,
computed at every call: an edited file gets a new cache folder, never a stale one. The cache is
``<cache dir>/text/<name>/<tokenizer><vocab>-v<version>-<key>/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path
from typing import Any

from prunelab._validation import MAPPING, MAX_VOCAB, PATH, STR, Interval, Options, check_type, validate_params
from prunelab.data._hashing import sha256_file
from prunelab.data._paths import cache_dir
from prunelab.data.errors import DatasetNotFoundError
from prunelab.data.source import Root
from prunelab.data.text import DEFAULT_SEQ_LEN, SEQ_LEN, SPLITS, TextDataset, TextSource
from prunelab.data.tokenizer import KINDS

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class _Files(TextSource):
    """The user's files, one per split, checksummed by their current sha256."""

    def __init__(self, name: str, paths: dict[str, Path]):
        super().__init__(
            name,
            f"text files {', '.join(str(p) for p in paths.values())}",
            {split: sha256_file(path) for split, path in paths.items()},
            {split: (split, None) for split in SPLITS},
            algorithm="sha256",
            mirrors=[],
            sizes={},
        )
        self.folder = f"text/{name}"
        self._paths = paths

    def files(self) -> list[str]:
        return [str(p) for p in self._paths.values()]

    def paths(self, root: Root, download: bool) -> dict[str, Path]:
        return dict(self._paths)


def _split_files(files: Any, where: str) -> tuple[dict[str, Path], str]:
    """``({split: path}, default name)`` from a folder or a mapping of the three splits."""
    if isinstance(files, (str, os.PathLike)):
        folder = Path(files).expanduser()
        return {split: folder / f"{split}.txt" for split in SPLITS}, folder.resolve().name or "text"
    if isinstance(files, Mapping):
        if sorted(files) != sorted(SPLITS):
            raise ValueError(
                f"the 'files' parameter of {where} must map exactly the splits train, valid and "
                f"test to text files. Got the keys {sorted(map(str, files))} instead."
            )
        for split, path in files.items():
            check_type(f"files['{split}']", path, (str, os.PathLike), where=where, expected="a path")
        return {split: Path(files[split]).expanduser() for split in SPLITS}, "text"
    raise TypeError(
        f"the 'files' parameter of {where} must be a folder holding train.txt, valid.txt and "
        f"test.txt, or a dict of those three splits to paths. Got {type(files).__name__} instead."
    )


@validate_params(
    {
        "files": [PATH, MAPPING],
        "name": [STR, None],
        "vocab_size": [Interval(Integral, 2, MAX_VOCAB), None],
        "seq_len": [SEQ_LEN],
        "stride": [SEQ_LEN, None],
        "tokenizer": [Options(KINDS)],
    }
)
def load_text(
    files: str | os.PathLike | Mapping[str, str | os.PathLike],
    *,
    name: str | None = None,
    vocab_size: int | None = None,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
    tokenizer: str = "bpe",
) -> TextDataset:
    """A :class:`TextDataset` from UTF-8 text files: a folder with ``train.txt``, ``valid.txt`` and
    ``test.txt``, or a dict ``{"train": path, "valid": path, "test": path}``. ``name`` (default: the
    folder's name, else ``"text"``) names the dataset and its cache folder. The other options are
    those of the named text datasets (docs/data.md, "Text datasets")."""
    where = "load_text"
    paths, default_name = _split_files(files, where)
    name = default_name if name is None else check_type("name", name, str, where=where)
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"the 'name' parameter of {where} must be letters, digits, '.', '_' or '-' (it names "
            f"a cache folder). Got {name!r} instead."
        )
    missing = [f"{split}: {path}" for split, path in paths.items() if not path.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{where}: {len(missing)} text file(s) missing:\n  " + "\n  ".join(missing))
    source = _Files(name, paths)
    return source.load_as(where, cache_dir(), False, vocab_size, seq_len, stride, tokenizer)
