"""Study F's harness pieces: the ``structured`` task (units.prune_transformer as a study method),
``training.finetune_steps``, and N:M levels of a prune method; a tiny GPT on a generated 'pydocs'."""

from __future__ import annotations

import pytest
import torch
from test_lm_study import DATASET, LSTM, lm_spec, pydocs  # noqa: F401  (pydocs: the generated-data fixture)

from prunelab.experiments import Store, build_study, run_study
from prunelab.experiments.prune_task import load_prepared_dataset
from prunelab.models import build_model
from prunelab.training import evaluate

pytestmark = pytest.mark.usefixtures("isolated_data")

GPT2 = {"name": "gpt", "label": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2}
TRAIN = {"epochs": 1, "finetune_epochs": 0, "batch_size": 32, "optimizer": "adam", "lr": 3e-3}


def structured_spec(*methods, models=(GPT2,), training=TRAIN) -> dict:
    return lm_spec(
        models=list(models),
        methods=[{"label": "magnitude"}, *methods],
        training=dict(training),
        outputs={"tables": [{"rows": "method", "columns": "sparsity", "metric": "perplexity"}]},
    )


def test_structured_runs_cut_heads_mlp_and_blocks_of_the_shared_dense_model(tmp_path, pydocs):
    from prunelab.units import prune_transformer

    spec = structured_spec(
        {
            "label": "cut",
            "task": "structured",
            "sparsities": [0.5],
            "refit": False,
            "calibration": 32,
            "latency": {"batch_sizes": [1], "rounds": 1},
        },
        {"label": "cut+refit", "task": "structured", "sparsities": [0.5], "calibration": 32, "latency": False},
        {
            "label": "block",
            "task": "structured",
            "heads": False,
            "mlp": False,
            "blocks": 1,
            "sparsities": [0.0],
            "calibration": 32,
            "latency": False,
        },
    )
    study = build_study(spec)
    assert sorted(r.config["task"] for r in study.runs) == ["prune", "structured", "structured", "structured"]
    result = run_study(study, tmp_path / "s.db", progress=False)
    assert result.counts["done"] == 4, result.counts
    with Store(tmp_path / "s.db") as store:
        records = {r.method: r.metrics for r in store.records()}
    # every run prunes the same cached dense model
    assert len({m["perplexity_dense"] for m in records.values()}) == 1
    # the run equals prune_transformer called directly on that dense model
    config = next(r.config for r in study.runs if r.method == "cut")
    ds = load_prepared_dataset(config["dataset"])
    dense = build_model("gpt", dataset=ds, seed=0, **config["model"]["options"])
    (cached,) = (tmp_path / "cache" / "dense").glob("*.pt")  # one dense model for all four runs
    dense.load_state_dict(torch.load(cached)["state_dict"])
    direct = prune_transformer(dense, (ds.x_train[:32], ds.y_train[:32]), heads=0.5, mlp=0.5, refit=False)
    cut = records["cut"]
    assert cut["params"] == sum(p.numel() for p in direct.model.parameters()) < cut["params_dense"]
    assert cut["perplexity"] == pytest.approx(evaluate(direct.model, (ds.x_test, ds.y_test))["perplexity"], rel=1e-6)
    assert cut["perplexity"] == cut["perplexity_pruned"]  # no recovery
    assert cut["kept"] == direct.kept and set(cut["kept"].values()) == {1, 64}  # 2 → 1 heads, 128 → 64 channels
    assert cut["sparsity"] == pytest.approx(1 - cut["params"] / cut["params_dense"])
    assert cut["flops"] < cut["flops_dense"] and cut["latency_ms_b1"] > 0 and cut["measured_speedup_b1"] > 0
    assert "latency_ms_b1" not in records["cut+refit"]
    assert records["cut+refit"]["params"] == cut["params"] and records["cut+refit"]["refits"] >= 0
    assert records["block"]["blocks_removed"] == 1 and len(records["block"]["removed_blocks"]) == 1


def test_structured_recovery_fine_tunes_the_thinned_model_with_distillation(tmp_path, pydocs):
    spec = structured_spec(
        {
            "label": "cut+kd",
            "task": "structured",
            "sparsities": [0.5],
            "calibration": 32,
            "latency": False,
            "distill": True,
        },
        training={**TRAIN, "finetune_epochs": 1, "finetune_steps": 2},
    )
    run_study(build_study(spec), tmp_path / "kd.db", progress=False)
    with Store(tmp_path / "kd.db") as store:
        record = next(r for r in store.records() if r.method == "cut+kd")
    tuned = [row for row in record.curve if row["phase"] == "prune"]
    assert len(tuned) == 1 and tuned[0]["step"] == 2 and "distill_loss" in tuned[0]
    assert record.metrics["perplexity"] != record.metrics["perplexity_pruned"]


@pytest.mark.parametrize(
    "method, message",
    [
        ({"heads": "yes"}, r"methods\[1\]\.heads: must be true"),
        ({"blocks": 2}, "at least one must stay"),
        ({"blocks": -1}, r"methods\[1\]\.blocks"),
        ({"refit": "exact"}, r"methods\[1\]\.refit"),
        ({"heads": False, "mlp": False, "blocks": 1, "sparsities": [0.5]}, "removes nothing"),
        ({"heads": False, "mlp": False}, "removes nothing"),
        ({"criterion": "wanda"}, r"methods\[1\]\.criterion: unknown key"),
        ({"latency": {"repeats": 2}}, r"latency\.repeats"),
        ({"distill": True}, "finetune_epochs is 0"),
        ({"sparsities": [{"blocks.0.mlp.fc1": 0.5}]}, "per-layer sparsity mapping"),
    ],
)
def test_structured_methods_are_validated(pydocs, method, message):
    with pytest.raises(ValueError, match=message):
        build_study(structured_spec({"label": "s", "task": "structured", "sparsities": [0.5], **method}))


def test_structured_task_says_when_a_model_has_no_attention_heads(pydocs):
    with pytest.raises(ValueError, match=r"methods\[1\]"):
        build_study(
            structured_spec(
                {"label": "s", "task": "structured", "sparsities": [0.5]}, models=({**LSTM, "label": "lstm"},)
            )
        )


def test_finetune_steps_caps_the_fine_tuning_phase_and_is_resolved_only_when_given(tmp_path, pydocs):
    from prunelab.engine.harness import why_not_batched

    capped = build_study(structured_spec(training={**TRAIN, "finetune_epochs": 2, "finetune_steps": 3}))
    config = capped.runs[0].config
    assert config["training"]["finetune_steps"] == 3 and "finetune_steps" in why_not_batched(config)
    assert "finetune_steps" not in build_study(structured_spec()).runs[0].config["training"]  # old ids kept
    run_study(capped, tmp_path / "c.db", progress=False)
    with Store(tmp_path / "c.db") as store:
        (record,) = store.records()
    tuned = [row for row in record.curve if row["phase"] == "prune"]
    assert [row["step"] for row in tuned] == [3]  # stopped inside the first of two epochs
    with pytest.raises(ValueError, match=r"training\.finetune_steps"):
        build_study(structured_spec(training={**TRAIN, "finetune_steps": 0}))
    agp = {"label": "agp", "schedule": {"name": "agp", "n_prunes": 4, "every": 2}}
    with pytest.raises(ValueError, match="capped by training.finetune_steps"):
        build_study(lm_spec(methods=[agp], training={**TRAIN, "finetune_epochs": 2, "finetune_steps": 3}))


def test_nm_levels_of_a_prune_method_leave_at_most_n_of_every_m(tmp_path, pydocs):
    spec = lm_spec(
        models=[GPT2],
        methods=[
            {"label": "wanda 2:4", "criterion": "wanda", "granularity": "2:4", "calibration": 32, "sparsities": [0.5]},
            {
                "label": "obs-fast 4:8",
                "criterion": "obs-fast",
                "granularity": "4:8",
                "calibration": 32,
                "sparsities": [0.5],
            },
        ],
        training=TRAIN,
    )
    run_study(build_study(spec), tmp_path / "nm.db", progress=False)
    with Store(tmp_path / "nm.db") as store:
        records = {r.method: r for r in store.records()}
    assert set(records) == {"wanda 2:4", "obs-fast 4:8"}
    for record in records.values():
        assert all(s == pytest.approx(0.5) for s in record.metrics["layer_sparsity"].values())
    with pytest.raises(
        ValueError, match=r"methods\[0\]\.granularity: .2:4. prunes every layer to 0.5.*sparsities: \[0.5\] \(got 0.7\)"
    ):
        build_study(
            lm_spec(models=[GPT2], methods=[{"label": "m", "granularity": "2:4"}], sparsities=[0.7], training=TRAIN)
        )
