"""Tokenizers for the text datasets, trained with the ``tokenizers`` package: byte-level BPE, and
a word-level vocabulary for corpora that are already word-tokenized (the Penn Treebank).

Byte-level BPE (GPT-2's scheme) starts from the 256 byte values, so every text — any
language, code, markup — encodes without an unknown token and decodes back to exactly the
same string; merges of frequent byte pairs are learned on a training text until the
vocabulary has ``vocab_size`` entries (fewer when the text runs out of pairs seen at least
twice). No special tokens are added.

A text is encoded **line by line** (each line keeps its ``"\\n"``) and the ids concatenated:
the same split is used for training, so the result does not depend on how a file is read, and
the lines are encoded in parallel. Training on the same text with the same ``vocab_size`` gives
the same tokenizer, byte for byte (``tests/test_data_text.py`` checks it).

The **word-level** tokenizer (:func:`train_word_tokenizer`) follows the language-modelling papers'
reading of the Penn Treebank (Mikolov et al. 2010, Zaremba et al. 2014): the tokens are the
whitespace-separated words, every line end is the token ``<eos>``, and a word outside the
vocabulary is ``<unk>``. Decoding gives the words separated by single spaces, ``<eos>`` included;
the original spacing is not kept.

``tokenizers`` is an optional dependency (the ``prunelab[text]`` or ``prunelab[hf]`` extras; it
is in ``requirements.lock``): it is imported only when a tokenizer is trained or loaded, and a
missing package is one clear ``ImportError``. Token ids that are already cached load without it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from prunelab._validation import MAX_VOCAB, STR, Interval, Types, check_number, check_type, validate_params

#: The smallest vocabulary: the 256 single bytes.
MIN_VOCAB = 256
#: Bumped whenever the training recipe changes, so older caches are not reused.
TOKENIZER_VERSION = 1
MIN_FREQUENCY = 2
EOS, UNK = "<eos>", "<unk>"
KINDS = ("bpe", "word")


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "text datasets need the 'tokenizers' package to train or load their byte-level BPE "
            "tokenizer; install it with `pip install tokenizers` (or the prunelab[text] "
            "extra)."
        ) from None
    return tokenizers


def lines_of(text: str) -> list[str]:
    """``text`` split after each ``"\\n"`` (the pieces concatenate back to ``text``; unlike
    ``str.splitlines``, no other character ends a line)."""
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    return out + ([parts[-1]] if parts[-1] else [])


@validate_params({"text": [STR, Types(Iterable)], "vocab_size": [Interval(Integral, MIN_VOCAB, MAX_VOCAB)]})
def train_tokenizer(text: str | Iterable[str], vocab_size: int = 8192) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``text`` (a string, or its lines).

    ``vocab_size`` is the largest vocabulary (at least 256, the single bytes); merges are
    learned from pairs that occur at least twice, so a small text may give fewer entries.
    Deterministic: the same text and ``vocab_size`` give the same tokenizer.
    """
    where = "train_tokenizer"
    vocab_size = int(vocab_size)
    lines = lines_of(text) if isinstance(text, str) else list(text)
    if not any(lines):
        raise ValueError(f"the 'text' parameter of {where} is empty; a tokenizer needs text to learn from.")
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_FREQUENCY,
        show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def train_word_tokenizer(text: str, vocab_size: int | None = None) -> Any:
    """A word-level ``tokenizers.Tokenizer`` of the words of ``text`` (line ends are ``<eos>``).

    The vocabulary is every word (or the ``vocab_size - 1`` most frequent) in order of decreasing
    count, ties in code-point order, then ``<unk>`` for any other word. Deterministic.
    """
    where = "train_word_tokenizer"
    check_type("text", text, str, where=where)
    if vocab_size is not None:
        vocab_size = check_number("vocab_size", vocab_size, where=where, low=2, high=MAX_VOCAB, integer=True)
    counts = Counter(text.replace("\n", f" {EOS} ").split())
    counts.pop(UNK, None)
    if not counts:
        raise ValueError(f"the 'text' parameter of {where} has no words; a tokenizer needs text to learn from.")
    words = sorted(counts, key=lambda w: (-counts[w], w))
    if vocab_size is not None:
        words = words[: vocab_size - 1]
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.WordLevel({w: i for i, w in enumerate([*words, UNK])}, unk_token=UNK))
    tokenizer.normalizer = tk.normalizers.Replace("\n", f" {EOS} ")
    tokenizer.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved as JSON at ``path`` (``tokenizer.save(path)``)."""
    check_type("path", path, (str, os.PathLike), where="load_tokenizer", expected="a path")
    return _tokenizers().Tokenizer.from_file(str(Path(path)))


def encode(tokenizer: Any, text: str) -> np.ndarray:
    """The token ids of ``text`` (encoded line by line), as an int64 array."""
    check_type("text", text, str, where="encode")
    pieces = tokenizer.encode_batch(lines_of(text), add_special_tokens=False)
    lengths = [len(p.ids) for p in pieces]
    out = np.empty(sum(lengths), dtype=np.int64)
    start = 0
    for piece, n in zip(pieces, lengths):
        out[start : start + n] = piece.ids
        start += n
    return out


def decode(tokenizer: Any, ids: Any) -> str:
    """The text of token ids ``ids`` (a sequence, array or tensor of ints)."""
    flat = np.asarray(ids.tolist() if hasattr(ids, "tolist") else list(ids), dtype=np.int64).reshape(-1)
    return tokenizer.decode(flat.tolist(), skip_special_tokens=False)
