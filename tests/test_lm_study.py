"""Language models in the study harness and the CLI: a tiny GPT on a tiny generated 'pydocs'."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from prunelab.cli import main
from prunelab.data import dry_run_inputs, load_dataset
from prunelab.data import text
from prunelab.experiments import Store, build_study, run_study

pytestmark = pytest.mark.usefixtures("isolated_data")

WORDS = ("the model prunes weights of every layer and the loss grows slowly while sparsity rises def return "
         "class import from self value None True False print(x) for in range if else").split()


def corpus(n_lines: int, seed: int) -> str:
    """Seeded lines of words with a little structure (a word often follows its neighbour)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        start = int(rng.integers(0, len(WORDS)))
        words = [WORDS[(start + i + int(rng.integers(0, 2))) % len(WORDS)] for i in range(int(rng.integers(3, 12)))]
        lines.append("    " * int(rng.integers(0, 2)) + " ".join(words))
    return "\n".join(lines) + "\n"


@pytest.fixture
def pydocs(tmp_path, monkeypatch):
    """A small generated 'pydocs' folder as the data root (its md5s patched into the checksum table)."""
    folder = tmp_path / "root" / "pydocs"
    folder.mkdir(parents=True)
    for split, n_lines, seed in (("train", 1500, 0), ("valid", 150, 1), ("test", 150, 2)):
        data = corpus(n_lines, seed).encode()
        (folder / f"{split}.txt").write_bytes(data)
        monkeypatch.setitem(text.PYDOCS_MD5, f"{split}.txt", hashlib.md5(data).hexdigest())
    monkeypatch.setenv("PRUNELAB_DATA", str(tmp_path / "root"))
    return tmp_path / "root"


DATASET = {"name": "pydocs", "vocab_size": 256, "seq_len": 32}
GPT = {"name": "gpt", "d_model": 32, "n_layers": 1, "n_heads": 2}


def lm_spec(**changes) -> dict:
    spec = {"name": "lm", "datasets": [DATASET], "models": [GPT],
            "methods": [{"label": "magnitude"}, {"label": "obs-fast", "criterion": "obs-fast", "calibration": 64}],
            "sparsities": [0.5], "seeds": 1,
            "training": {"epochs": 1, "finetune_epochs": 0, "batch_size": 32, "optimizer": "adam", "lr": 3e-3},
            "outputs": {"tables": [{"rows": "sparsity", "columns": "method", "metric": "perplexity"}]}}
    spec.update(changes)
    return spec


def test_dry_run_inputs_are_token_ids_for_text_and_the_shape_for_images(pydocs):
    ds = load_dataset("pydocs", vocab_size=256, seq_len=32)
    dry = dry_run_inputs(ds)
    assert set(dry) == {"example_inputs"} and dry["example_inputs"].dtype == torch.int64
    assert torch.equal(dry["example_inputs"], ds.x_train[:1])
    assert dry_run_inputs(load_dataset("digits")) == {"input_shape": (1, 8, 8)}


def test_tiny_lm_study_records_perplexity_and_tables_show_it(tmp_path, pydocs):
    from prunelab.experiments.tables import build_tables
    study = build_study(lm_spec())
    result = run_study(study, tmp_path / "lm.db", progress=False)
    assert result.counts["done"] == 2, result.counts
    with Store(tmp_path / "lm.db") as store:
        records = store.records()
        (table,) = build_tables(records, study.outputs)
    ds = load_dataset("pydocs", vocab_size=256, seq_len=32)
    for r in records:
        m = r.metrics
        assert m["sparsity"] == pytest.approx(0.5, abs=0.02)
        # perplexity is exp(mean token loss); pruning without recovery makes it worse than dense
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        assert m["perplexity_pruned"] == pytest.approx(m["perplexity"])   # no fine-tuning
        assert m["perplexity_dense"] < m["perplexity"] < ds.vocab_size * 4
        assert m["val_perplexity"] > 1 and m["val_perplexity_dense"] > 1
        assert m["tokens"] == ds.x_test.numel() and 0 < m["accuracy"] < 1
        assert m["flops"] < m["flops_dense"] and m["nonzero_params"] < m["params"]
    _, cells = table.rows[0]
    by_method = {r.method: r.metrics["perplexity"] for r in records}
    assert [c.mean for c in cells] == pytest.approx([by_method[m] for m in table.column_labels])
    assert table.title.startswith("perplexity")
