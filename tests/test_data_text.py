"""Text datasets: the BPE tokenizer, sequences, the checksummed cache, and downloads of PTB and
WikiText-2 from a loopback HTTP server — all on small generated texts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from test_data_mnist import server  # noqa: F401  (the loopback HTTP server fixture)

from prunelab.data import (
    ChecksumError,
    DatasetNotFoundError,
    TextDataset,
    dataset_info,
    fetch,
    load_dataset,
    load_text,
    sequences,
    text,
    tokenizer,
)
from prunelab.data.tokenizer import decode, encode, train_tokenizer

pytestmark = pytest.mark.usefixtures("isolated_data")

WORDS = (
    "the model prunes weights of every layer and the loss grows slowly while sparsity rises "
    "def return class import from self value None True False print(x) [1, 2, 3] naïve café"
).split()


def corpus(n_lines: int, seed: int) -> str:
    """Seeded lines of words, some indented like code, some blank."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        words = rng.choice(WORDS, size=int(rng.integers(0, 12)))
        lines.append("    " * int(rng.integers(0, 3)) + " ".join(words))
    return "\n".join(lines) + "\n"


TEXTS = {"train": corpus(400, 0), "valid": corpus(60, 1), "test": corpus(60, 2)}


@pytest.fixture
def pydocs(tmp_path, monkeypatch):
    """A tiny 'pydocs' folder under tmp_path/root, its md5s patched into the checksum table."""
    folder = tmp_path / "root" / "pydocs"
    folder.mkdir(parents=True)
    for split, body in TEXTS.items():
        data = body.encode("utf-8")
        (folder / f"{split}.txt").write_bytes(data)
        monkeypatch.setitem(text.PYDOCS_MD5, f"{split}.txt", hashlib.md5(data).hexdigest())
    return tmp_path / "root"


def cache_folder(root, vocab_size=300):
    found = [p for p in (root / "pydocs").iterdir() if p.is_dir() and p.name.startswith(f"bpe{vocab_size}-")]
    assert len(found) == 1, found
    return found[0]


# -- the tokenizer -------------------------------------------------------------------
def test_tokenizer_round_trips_any_text_including_unseen_characters():
    tok = train_tokenizer(TEXTS["train"], vocab_size=300)
    for sample in (TEXTS["valid"], "emoji 🙂 and ünïcödé\r\n\ttabs\n\n", "", "no newline at the end"):
        ids = encode(tok, sample)
        assert ids.dtype == np.int64 and decode(tok, ids) == sample
    assert len(encode(tok, TEXTS["valid"])) < len(TEXTS["valid"].encode())  # merges were learned


def test_tokenizer_is_deterministic_and_bounded():
    a = train_tokenizer(TEXTS["train"], vocab_size=300)
    b = train_tokenizer(tokenizer.lines_of(TEXTS["train"]), vocab_size=300)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 300
    small = train_tokenizer("ab ab ab\n", vocab_size=5000)  # runs out of pairs: fewer entries
    assert 256 < small.get_vocab_size() < 300


def test_lines_of_splits_only_at_newlines():
    s = "a\rb\x0cc\nd\n\ne"
    assert tokenizer.lines_of(s) == ["a\rb\x0cc\n", "d\n", "\n", "e"] and "".join(tokenizer.lines_of(s)) == s


@pytest.mark.parametrize("vocab_size, error", [(255, ValueError), (300.5, TypeError), ("8k", TypeError)])
def test_tokenizer_rejects_bad_vocab_sizes(vocab_size, error):
    with pytest.raises(error, match="vocab_size"):
        train_tokenizer(TEXTS["train"], vocab_size=vocab_size)


def test_missing_tokenizers_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        train_tokenizer(TEXTS["train"], vocab_size=300)


def test_word_tokenizer_counts_words_and_line_ends():
    tok = tokenizer.train_word_tokenizer("b a b\nc b <unk>\n", vocab_size=None)
    assert tok.get_vocab() == {"b": 0, "<eos>": 1, "a": 2, "c": 3, "<unk>": 4}  # by count, ties by code point
    ids = encode(tok, " a  z b\n")
    assert ids.tolist() == [2, 4, 0, 1] and decode(tok, ids) == "a <unk> b <eos>"
    capped = tokenizer.train_word_tokenizer("b a b\nc b\n", vocab_size=3)
    assert capped.get_vocab() == {"b": 0, "<eos>": 1, "<unk>": 2}


def test_word_level_dataset_has_one_eos_per_line(pydocs):
    ds = load_dataset("pydocs", root=pydocs, tokenizer="word", seq_len=8)
    eos = ds.tokenizer.token_to_id("<eos>")
    stream = torch.cat([ds.x_train.flatten(), ds.y_train[-1, -1:]])
    words = ds.decode(stream).split()
    assert words == TEXTS["train"].replace("\n", " <eos> ").split()[: len(words)]  # the stream's prefix
    assert int((stream == eos).sum()) == words.count("<eos>") > 100
    assert ds.vocab_size == len(set(TEXTS["train"].split())) + 2  # + <eos>, <unk>
    assert ds.tokenizer_path.parent.name.startswith("wordall-")
    with pytest.raises(ValueError, match="'tokenizer' parameter of load_dataset must be one of: bpe, word"):
        load_dataset("pydocs", root=pydocs, tokenizer="char")


# -- sequences -------------------------------------------------------------------------
def test_sequences_are_windows_and_their_next_tokens():
    stream = np.arange(23)
    x, y = sequences(stream, 5)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 5)  # 22 targets // 5
    assert x[1].tolist() == [5, 6, 7, 8, 9] and y[1].tolist() == [6, 7, 8, 9, 10]
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_overlapping_windows_count_every_target_once():
    stream = torch.arange(100, 131)
    x, y = sequences(stream, 8, stride=3)
    assert x.shape == (8, 8) and x[2, 0] == 106  # (30 - 8) // 3 + 1 windows
    counted = y[y != -100].tolist()
    assert counted == list(range(101, 101 + len(counted)))  # each target once, in order
    assert (y[1:, :5] == -100).all() and (y[0] != -100).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"seq_len": 0}, ValueError, "seq_len"),
        ({"seq_len": 4, "stride": 5}, ValueError, "stride"),
        ({"seq_len": 4, "stride": 0}, ValueError, "stride"),
        ({"seq_len": 10}, ValueError, "only 10 tokens"),
    ],
)
def test_sequences_reject_bad_lengths(kwargs, error, message):
    with pytest.raises(error, match=message):
        sequences(np.arange(10), **kwargs)


def test_text_dataset_validates_ids_and_shapes():
    x = torch.randint(0, 9, (4, 6))
    ok = dict(x_train=x, y_train=x, x_test=x, y_test=x, vocab_size=9)
    TextDataset("t", **ok)
    with pytest.raises(ValueError, match=r"token ids in \[0, 5\)"):
        TextDataset("t", **{**ok, "vocab_size": 5})
    with pytest.raises(ValueError, match="x_train.*int64"):
        TextDataset("t", **{**ok, "x_train": x.float()})
    with pytest.raises(ValueError, match="y_test.*shape"):
        TextDataset("t", **{**ok, "y_test": x[:, :3]})


# -- a text dataset from files, and its cache ---------------------------------------------
def test_load_cuts_each_split_and_decodes_back(pydocs):
    ds = load_dataset("pydocs", root=pydocs, vocab_size=300, seq_len=16)
    assert isinstance(ds, TextDataset) and ds.input_shape == (16,) and ds.n_classes == ds.vocab_size == 300
    for split, (x, y) in {"train": ds.train, "valid": ds.val, "test": ds.test}.items():
        assert x.dtype == torch.int64 and x.shape[1] == 16 and torch.equal(y[:, :-1], x[:, 1:])
        whole = ds.decode(torch.cat([x.flatten(), y[-1, -1:]]))
        assert TEXTS[split].startswith(whole) and len(TEXTS[split]) - len(whole) < 16 * 4  # < one window left
    assert ds.decode(ds.encode(TEXTS["test"])) == TEXTS["test"]
    info = dataset_info("pydocs", root=pydocs)
    assert info["input_shape"] == (128,) and info["download"] == [] and info["class_names"] == []


def test_cache_is_reused_and_records_what_the_tokenizer_saw(pydocs, monkeypatch):
    first = load_dataset("pydocs", root=pydocs, vocab_size=300, seq_len=16)
    folder = cache_folder(pydocs)
    assert sorted(os.listdir(folder)) == ["manifest.json", "test.npy", "tokenizer.json", "train.npy", "valid.npy"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokenizer"]["trained_on"]["sha256"] == hashlib.sha256(TEXTS["train"].encode()).hexdigest()
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    monkeypatch.setattr(text, "train_tokenizer", lambda *a, **k: pytest.fail("retrained despite a valid cache"))
    for name in TEXTS:  # a cached dataset loads without its sources
        (pydocs / "pydocs" / f"{name}.txt").unlink()
    again = load_dataset("pydocs", root=pydocs, vocab_size=300, seq_len=16)
    assert ds_equal(first, again) and again.tokenizer_path == folder / "tokenizer.json"
    longer = load_dataset("pydocs", root=pydocs, vocab_size=300, seq_len=32)  # same cache, other cut
    assert longer.x_train.shape[1] == 32 and torch.equal(longer.x_train[0, :16], first.x_train[0])


def ds_equal(a, b):
    return all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    )


def test_two_builds_give_identical_caches(tmp_path, pydocs, monkeypatch):
    load_dataset("pydocs", root=pydocs, vocab_size=300)
    monkeypatch.setenv("PRUNELAB_CACHE", str(tmp_path / "other-cache"))
    other = tmp_path / "other-root"
    (other / "pydocs").mkdir(parents=True)
    for name in TEXTS:
        (other / "pydocs" / f"{name}.txt").write_bytes((pydocs / "pydocs" / f"{name}.txt").read_bytes())
    load_dataset("pydocs", root=other, vocab_size=300)
    a, b = cache_folder(pydocs), cache_folder(other)
    assert a.name == b.name
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda f: f.joinpath("train.npy").write_bytes(f.joinpath("train.npy").read_bytes()[:-2] + b"\0\0"),
            "sha256 of train.npy",
        ),
        (
            lambda f: f.joinpath("tokenizer.json").write_text(f.joinpath("tokenizer.json").read_text() + " "),
            "sha256 of tokenizer.json",
        ),
        (lambda f: f.joinpath("valid.npy").unlink(), "valid.npy is missing"),
        (
            lambda f: f.joinpath("manifest.json").write_text(
                f.joinpath("manifest.json")
                .read_text()
                .replace('"vocab_size_requested": 300', '"vocab_size_requested": 9')
            ),
            "vocab_size_requested",
        ),
    ],
)
def test_a_damaged_cache_is_an_error_not_reused(pydocs, damage, message):
    load_dataset("pydocs", root=pydocs, vocab_size=300)
    folder = cache_folder(pydocs)
    damage(folder)
    with pytest.raises(ValueError, match=message) as e:
        load_dataset("pydocs", root=pydocs, vocab_size=300)
    assert f"Delete the folder {folder}" in str(e.value)


def test_an_interrupted_cache_is_rebuilt(pydocs):
    first = load_dataset("pydocs", root=pydocs, vocab_size=300)
    (cache_folder(pydocs) / "manifest.json").unlink()  # written last: the build did not finish
    assert ds_equal(first, load_dataset("pydocs", root=pydocs, vocab_size=300))


def test_another_vocabulary_gets_its_own_cache(pydocs):
    a = load_dataset("pydocs", root=pydocs, vocab_size=300)
    b = load_dataset("pydocs", root=pydocs, vocab_size=280)
    assert b.vocab_size == 280 and a.tokenizer_path.parent != b.tokenizer_path.parent
    assert int(b.x_train.max()) < 280


def test_a_changed_source_file_is_a_checksum_error(pydocs):
    (pydocs / "pydocs" / "valid.txt").write_text("edited\n")
    with pytest.raises(ChecksumError, match=r"valid.txt: expected md5 .* got"):
        load_dataset("pydocs", root=pydocs, vocab_size=300)


def test_missing_pydocs_lists_files_without_a_download_hint(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("pydocs", root=tmp_path / "empty")
    msg = str(e.value)
    assert all(f"{s}.txt" in msg for s in TEXTS) and "PRUNELAB_DATA" in msg and "download=True" not in msg


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"vocab_size": 100}, ValueError, "vocab_size"),
        ({"seq_len": 0}, ValueError, "seq_len"),
        ({"seq_len": 8, "stride": 9}, ValueError, "stride"),
        ({"seq_len": 10**6}, ValueError, "split 'train'.*seq_len"),
        ({"seed": 1}, TypeError, "vocab_size, seq_len, stride"),
    ],
)
def test_bad_options(pydocs, options, error, message):
    with pytest.raises(error, match=message):
        load_dataset("pydocs", root=pydocs, **{"vocab_size": 300, **options})


def test_stride_and_subset(pydocs):
    ds = load_dataset("pydocs", root=pydocs, vocab_size=300, seq_len=16, stride=8)
    assert ds.stride == 8 and (ds.y_train[1:, :8] == -100).all()
    small = ds.subset(n_train=5, n_test=3, n_val=2, seed=1)
    assert (len(small.x_train), len(small.x_test), len(small.x_val)) == (5, 3, 2)
    assert small.tokenizer_path == ds.tokenizer_path
    rows = [i for i in range(len(ds.x_train)) if any(torch.equal(ds.x_train[i], r) for r in small.x_train)]
    assert len(rows) == 5 and rows == sorted(rows)


# -- your own files ------------------------------------------------------------------------
def test_load_text_from_a_folder_and_a_new_cache_after_an_edit(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, body in TEXTS.items():
        (folder / f"{split}.txt").write_text(body, encoding="utf-8")
    ds = load_text(folder, vocab_size=300, seq_len=16)
    assert ds.name == "corpus" and ds.x_train.shape[1] == 16 and ds.decode(ds.encode(TEXTS["test"])) == TEXTS["test"]
    assert ds.tokenizer_path.parent.parent == tmp_path / "cache" / "text" / "corpus"
    same = load_text({split: folder / f"{split}.txt" for split in TEXTS}, name="corpus", vocab_size=300, seq_len=16)
    assert same.tokenizer_path == ds.tokenizer_path and ds_equal(ds, same)
    (folder / "train.txt").write_text(TEXTS["train"] + "one more line\n", encoding="utf-8")
    edited = load_text(folder, vocab_size=300, seq_len=16)
    assert edited.tokenizer_path != ds.tokenizer_path


@pytest.mark.parametrize(
    "files, kwargs, error, message",
    [
        ({"train": "a"}, {}, ValueError, "must map exactly the splits train, valid and test"),
        (3, {}, TypeError, "'files' parameter of load_text"),
        ("corpus", {"name": "../up"}, ValueError, "'name' parameter of load_text"),
        ("corpus", {"seq_len": 0}, ValueError, "'seq_len' parameter of load_text"),
        ("nowhere", {}, DatasetNotFoundError, "3 text file.s. missing"),
    ],
)
def test_load_text_rejects_bad_arguments(tmp_path, files, kwargs, error, message):
    (tmp_path / "corpus").mkdir()
    for split, body in TEXTS.items():
        (tmp_path / "corpus" / f"{split}.txt").write_text(body)
    with pytest.raises(error, match=message):
        load_text(tmp_path / files if isinstance(files, str) else files, **{"vocab_size": 300, **kwargs})


# -- downloads (PTB, WikiText-2) from a loopback server --------------------------------------
@pytest.fixture
def ptb_files(monkeypatch):
    blobs = {f"ptb.{split}.txt": body.encode() for split, body in TEXTS.items()}
    for name, blob in blobs.items():
        monkeypatch.setitem(text.PTB_SHA256, name, hashlib.sha256(blob).hexdigest())
    return blobs


def test_ptb_downloads_from_a_mirror_and_loads(tmp_path, server, ptb_files, monkeypatch):  # noqa: F811
    server.routes.update({f"/ptb/{n}": b for n, b in ptb_files.items()})
    monkeypatch.setattr(text.PTB, "mirrors", [f"{server.base}/gone/", f"{server.base}/ptb/"])
    paths = fetch("ptb", root=tmp_path / "root")
    assert sorted(p.name for p in paths) == sorted(ptb_files)
    ds = load_dataset("ptb", root=tmp_path / "root", vocab_size=300, seq_len=8)
    assert ds.decode(ds.x_test[0]) == TEXTS["test"][: len(ds.decode(ds.x_test[0]))]
    assert dataset_info("ptb")["download"][0] == f"{server.base}/gone/ptb.train.txt"


def test_ptb_wrong_bytes_are_a_sha256_checksum_error_and_leave_nothing(
    tmp_path,
    server,
    ptb_files,  # noqa: F811
    monkeypatch,
):
    server.routes.update({f"/bad/{n}": b + b"tampered" for n, b in ptb_files.items()})
    monkeypatch.setattr(text.PTB, "mirrors", [f"{server.base}/bad/"])
    with pytest.raises(ChecksumError) as e:
        load_dataset("ptb", root=tmp_path / "root", download=True)
    msg = str(e.value)
    expected = text.PTB_SHA256["ptb.train.txt"]
    actual = hashlib.sha256(ptb_files["ptb.train.txt"] + b"tampered").hexdigest()
    assert "ptb.train.txt" in msg and f"sha256 {expected}" in msg and actual in msg
    assert os.listdir(tmp_path / "root" / "ptb") == []


def test_ptb_offline_says_how_to_download(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"(?s)ptb.train.txt.*load_dataset\('ptb', download=True\)"):
        load_dataset("ptb", root=tmp_path / "root")


def wikitext_zip(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, body in members.items():
            archive.writestr(name, body)
    return buf.getvalue()


def test_wikitext2_downloads_the_archive_and_reads_its_members(tmp_path, server, monkeypatch):  # noqa: F811
    blob = wikitext_zip({f"wikitext-2-raw/wiki.{s}.raw": body for s, body in TEXTS.items()})
    server.routes[f"/wt/{text.WIKITEXT2_ARCHIVE}"] = blob
    monkeypatch.setitem(text.WIKITEXT2_SHA256, text.WIKITEXT2_ARCHIVE, hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(text.WIKITEXT2, "mirrors", [f"{server.base}/wt/"])
    ds = load_dataset("wikitext-2", root=tmp_path / "root", download=True, vocab_size=300, seq_len=8)
    assert ds.decode(ds.x_val.flatten()) == TEXTS["valid"][: len(ds.decode(ds.x_val.flatten()))]
    assert text.WIKITEXT2_ARCHIVE in os.listdir(tmp_path / "root" / "wikitext-2")


def test_wikitext2_archive_without_a_split_is_a_clear_error(tmp_path, monkeypatch):
    blob = wikitext_zip({"wikitext-2-raw/wiki.train.raw": TEXTS["train"]})
    (tmp_path / "root" / "wikitext-2").mkdir(parents=True)
    (tmp_path / "root" / "wikitext-2" / text.WIKITEXT2_ARCHIVE).write_bytes(blob)
    monkeypatch.setitem(text.WIKITEXT2_SHA256, text.WIKITEXT2_ARCHIVE, hashlib.sha256(blob).hexdigest())
    with pytest.raises(ValueError, match="no member 'wikitext-2-raw/wiki.valid.raw'"):
        load_dataset("wikitext-2", root=tmp_path / "root", vocab_size=300)


def test_published_checksums_are_well_formed():
    for table, length in ((text.PYDOCS_MD5, 32), (text.PTB_SHA256, 64), (text.WIKITEXT2_SHA256, 64)):
        assert all(len(d) == length and int(d, 16) >= 0 for d in table.values())


# -- the real corpus ------------------------------------------------------------------------------
# $PRUNELAB_DATA (read at import, before fixtures unset it), else the shared folder beside a checkout
REAL = os.environ.get("PRUNELAB_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.data
@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL, "pydocs", "train.txt")), reason="pydocs not present")
def test_real_pydocs_files_match_the_published_md5s_and_word_counts():
    texts = text.PYDOCS.texts(REAL)
    assert {s: len(t.split()) for s, t in texts.items()} == dict(text.PYDOCS.sizes)
    tok = train_tokenizer(texts["valid"], vocab_size=512)  # a slice: fast
    sample = texts["test"][:20000]
    assert decode(tok, encode(tok, sample)) == sample
