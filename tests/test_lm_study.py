"""Language models in the study harness and the CLI: a tiny GPT on a tiny generated 'pydocs'."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from prunelab.cli import main
from prunelab.data import dry_run_inputs, load_dataset, text
from prunelab.experiments import Store, build_study, run_study

pytestmark = pytest.mark.usefixtures("isolated_data")

WORDS = (
    "the model prunes weights of every layer and the loss grows slowly while sparsity rises def return "
    "class import from self value None True False print(x) for in range if else"
).split()


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
LSTM = {"name": "lstm-lm", "d_model": 32, "n_layers": 1}


def lm_spec(**changes) -> dict:
    spec = {
        "name": "lm",
        "datasets": [DATASET],
        "models": [GPT],
        "methods": [
            {"label": "magnitude"},
            {
                "label": "obs-fast",
                "criterion": "obs-fast",
                "calibration": 64,
                "latency": {"batch_sizes": [1, 4], "rounds": 1, "min_sparsity": 0.4},
            },
        ],
        "sparsities": [0.5],
        "seeds": 1,
        "training": {"epochs": 1, "finetune_epochs": 0, "batch_size": 32, "optimizer": "adam", "lr": 3e-3},
        "outputs": {"tables": [{"rows": "sparsity", "columns": "method", "metric": "perplexity"}]},
    }
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

    study = build_study(lm_spec(models=[GPT, LSTM]))
    result = run_study(study, tmp_path / "lm.db", progress=False)
    assert result.counts["done"] == 4, result.counts
    with Store(tmp_path / "lm.db") as store:
        records = store.records()
        tables = build_tables(records, study.outputs)
    ds = load_dataset("pydocs", vocab_size=256, seq_len=32)
    for r in records:
        m = r.metrics
        assert m["sparsity"] == pytest.approx(0.5, abs=0.02)
        # perplexity is exp(mean token loss); without fine-tuning the final model is the pruned one
        assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        assert m["perplexity_pruned"] == pytest.approx(m["perplexity"])
        assert 1 < m["perplexity_dense"] < ds.vocab_size and 1 < m["perplexity"] < ds.vocab_size
        assert m["val_perplexity"] > 1 and m["val_perplexity_dense"] > 1
        assert m["tokens"] == ds.x_test.numel() and 0 < m["accuracy"] < 1
        assert m["flops"] < m["flops_dense"] and m["nonzero_params"] < m["params"]
    for model in (GPT["name"], LSTM["name"]):  # the methods of a model share its dense model
        dense = {r.metrics["perplexity_dense"] for r in records if r.model.startswith(model + "[")}
        assert len(dense) == 1
    for r in records:
        timed = r.metrics
        if r.method != "obs-fast":
            assert "latency_ms_b1" not in timed
            continue
        assert {"dense", "sparse"} <= set(timed["latency"]["median_ms"])
        assert timed["latency_ms_b4"] > 0 and timed["sparse_speedup_b1"] > 0
        assert timed["latency"]["max_abs_diff"]["sparse"] < 1e-4  # CSR layers compute the same outputs
    assert len(tables) == 2  # one per model
    for table in tables:
        _, cells = table.rows[0]
        by_method = {r.method: r.metrics["perplexity"] for r in records if r.model in table.title}
        assert [c.mean for c in cells] == pytest.approx([by_method[m] for m in table.column_labels])
        assert table.title.startswith("perplexity")


def test_lm_runs_stay_single_with_a_reason_and_patience_is_checked(pydocs):
    from prunelab.engine.harness import why_not_batched
    from prunelab.experiments.study import plan_jobs

    study = build_study(lm_spec(training={"epochs": 3, "finetune_epochs": 0, "patience": 1}))
    configs = [run.config for run in study.runs]
    assert all(c["training"]["patience"] == 1 for c in configs)
    assert "early stopping" in why_not_batched(configs[0])
    assert all(not job.group for job in plan_jobs(study.runs))  # the batched engine: one run at a time
    no_patience = build_study(lm_spec()).runs[0].config
    assert "patience" not in no_patience["training"]  # older runs keep their ids
    assert "text dataset" in why_not_batched(no_patience)
    with pytest.raises(ValueError, match=r"training\.patience"):
        build_study(lm_spec(training={"epochs": 1, "patience": 0}))
    with pytest.raises(ValueError, match="validation split"):
        build_study(
            lm_spec(datasets=["digits"], models=[{"name": "mlp", "hidden": [8]}], training={"epochs": 1, "patience": 2})
        )


@pytest.mark.parametrize(
    "entry, message",
    [
        ({**DATASET, "validation": 0.1}, "own validation split"),
        ({**DATASET, "standardize": True}, "not standardised"),
        ({**DATASET, "seqlen": 8}, "unknown option"),
        ({**DATASET, "vocab_size": 10}, "vocab_size"),
        ({**DATASET, "subset": {"n_train": 10**7}}, "subset.n_train"),
        ({**DATASET, "subset": {"n_val": 10**7}}, "subset.n_val"),
        ({**DATASET, "subset": {"n_valid": 5}}, "n_train, n_test and/or n_val"),
    ],
)
def test_text_dataset_entries_are_validated(pydocs, entry, message):
    with pytest.raises(ValueError, match=message):
        build_study(lm_spec(datasets=[entry]))


@pytest.mark.parametrize(
    "latency, message",
    [
        ("yes", "must be true or a mapping"),
        ({"batch_sizes": [0]}, r"latency\.batch_sizes\[0\]"),
        ({"batch_sizes": 8}, "non-empty list"),
        ({"min_sparsity": 1.5}, "min_sparsity"),
        ({"repeats": 3}, "repeats"),
    ],
)
def test_latency_option_is_validated(pydocs, latency, message):
    with pytest.raises(ValueError, match=message):
        build_study(lm_spec(methods=[{"label": "m", "latency": latency}]))


def test_early_stopping_keeps_the_best_epoch(tmp_path, pydocs):
    spec = lm_spec(
        methods=[{"label": "magnitude"}],
        datasets=[{**DATASET, "subset": {"n_val": 30}}],
        training={"epochs": 6, "finetune_epochs": 0, "batch_size": 32, "optimizer": "adam", "lr": 0.05, "patience": 1},
    )
    run_study(build_study(spec), tmp_path / "es.db", progress=False)
    with Store(tmp_path / "es.db") as store:
        (record,) = store.records()
    m = record.metrics
    dense = [row for row in record.curve if row["phase"] == "dense"]
    assert len(dense) == m["dense_epochs"] and 1 <= m["dense_best_epoch"] <= m["dense_epochs"] <= 6
    losses = [row["val_loss"] for row in dense]
    assert m["dense_best_epoch"] == 1 + losses.index(min(losses))
    # the kept model is the best epoch's: its validation perplexity is that epoch's
    assert m["val_perplexity_dense"] == pytest.approx(math.exp(min(losses)), rel=1e-5)
    assert m["val_accuracy_dense"] == dense[m["dense_best_epoch"] - 1]["val_accuracy"]


def test_early_stopping_stops_after_patience_epochs_without_improvement_and_restores_the_best():
    from prunelab.experiments.prune_task import _EarlyStopping
    from prunelab.training import TrainState

    model = torch.nn.Linear(2, 2)
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    stopper = _EarlyStopping(patience=2)
    for epoch, val_loss in enumerate([3.0, 2.0, 2.5, 2.1, 1.0]):
        with torch.no_grad():
            model.weight.fill_(epoch)
        state.history.append({"epoch": epoch, "val_loss": val_loss})
        stopper.on_epoch_end(state)
        if state.stop:
            break
    assert epoch == 3  # epochs 2 and 3 did not beat epoch 1's 2.0
    stopper.restore(model)
    assert torch.all(model.weight == 1)  # the weights of the best epoch


TINY_GPT_ARGS = [
    "--model",
    "gpt",
    "--model-arg",
    "d_model=32",
    "--model-arg",
    "n_layers=1",
    "--model-arg",
    "n_heads=2",
    "--dataset",
    "pydocs",
    "--dataset-arg",
    "vocab_size=256",
    "--dataset-arg",
    "seq_len=32",
]


def test_cli_prune_trains_prunes_and_reports_perplexity(tmp_path, pydocs, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "prune",
            *TINY_GPT_ARGS,
            "--sparsity",
            "0.5",
            "--criterion",
            "obs-fast",
            "--calibration",
            "32",
            "--epochs",
            "1",
            "--finetune-epochs",
            "1",
            "--batch-size",
            "32",
            "--optimizer",
            "adam",
            "--lr",
            "0.003",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "test perplexity: dense" in printed and "token accuracy" in printed
    result = json.loads(out.read_text())
    assert result["sparsity"] == pytest.approx(0.5, abs=0.05)
    assert 1 < result["perplexity_dense"] < result["perplexity_after_first_prune"]
    assert result["perplexity_final"] < result["perplexity_after_first_prune"]  # fine-tuning recovers


def test_cli_summary_of_a_language_model_counts_flops_on_token_ids(capsys):
    code = main(["summary", *TINY_GPT_ARGS])
    assert code == 0
    assert "total" in capsys.readouterr().out
    assert main(["summary", *TINY_GPT_ARGS, "--dataset-arg", "sequence=3"]) == 2
    assert "not an option of dataset 'pydocs'" in capsys.readouterr().err


def test_cli_units_removes_heads_of_a_language_model(pydocs, capsys):
    code = main(
        [
            "units",
            *TINY_GPT_ARGS,
            "--method",
            "norm",
            "--fraction",
            "0.5",
            "--epochs",
            "1",
            "--calibration",
            "16",
            "--batch-size",
            "32",
            "--quiet",
        ]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "parameters" in printed and "units (norm)" in printed
