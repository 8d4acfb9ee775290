"""The command line and the quickstart, run in-process on the embedded digits data."""

import json
from pathlib import Path

import pytest
import torch

from prunelab.cli import main
from prunelab.data import DATASETS


def test_list_prints_every_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for line in ["criteria: gradient (gradient-magnitude), lobs (l-obs), magnitude, obd, obs-exact (obs_exact), obs-fast (obs_fast), random",
                 "scopes: global, layerwise-constant (layerwise_constant), local (layerwise)",
                 "granularities: channel, filter (unit), kernel, weight (unstructured)"]:
        assert line in out
    assert "lenet5" in out and "digits" in out


def test_prune_command_trains_prunes_and_saves(tmp_path, capsys):
    save_path, json_path = tmp_path / "m" / "model.pt", tmp_path / "r.json"
    code = main(["prune", "--dataset", "digits", "--model", "mlp", "--model-arg", "hidden=[32]",
                 "--sparsity", "0.8", "--scope", "global", "--schedule", "agp",
                 "--schedule-arg", "n_prunes=3", "--epochs", "3", "--finetune-epochs", "4",
                 "--save", str(save_path), "--json", str(json_path), "--quiet"])
    assert code == 0
    result = json.loads(json_path.read_text())
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert result["accuracy_final"] > 0.5
    saved = torch.load(save_path, weights_only=True)
    assert saved["config"]["hidden"] == [32]
    capsys.readouterr()
    assert main(["summary", "--model", "mlp", "--dataset", "digits", "--model-arg", "hidden=[32]",
                 "--weights", str(save_path)]) == 0
    out = capsys.readouterr().out
    # read back from the file: local 80 % of fc1 (2048 weights → 1638 pruned) and fc2 (320 → 256)
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert f"{100 * (1638 + 256) / 2368:.2f}" in total_line


def test_units_command_removes_thins_measures_and_saves(tmp_path, capsys):
    save_path, json_path = tmp_path / "thin.pt", tmp_path / "r.json"
    code = main(["units", "--model-arg", "hidden=[40,20]", "--epochs", "15", "--method", "bp_norm",
                 "--fraction", "0.25", "--latency", "--threads", "1", "--save", str(save_path),
                 "--json", str(json_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "fc1 40->30, fc2 20->15" in out and "measured speedup" in out
    result = json.loads(json_path.read_text())
    assert [len(v) for v in result["plan"].values()] == [10, 5]
    expected = 64 * 30 + 30 + 30 * 15 + 15 + 15 * 10 + 10
    assert result["params_thinned"] == expected
    assert result["accuracy_removed"] == result["accuracy_thinned"] > 0.8
    assert result["speedup_measured_b64"] > 0
    # the saved thinned model loads back through summary
    assert main(["summary", "--model", "mlp", "--dataset", "digits", "--model-arg", "hidden=[40,20]",
                 "--weights", str(save_path)]) == 0
    total_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert f"{expected:,}" in total_line


@pytest.mark.parametrize("argv,message", [
    (["units", "--method", "bp_nrom", "--fraction", "0.5"], "bp_nrom"),
    (["units", "--fraction", "0.5", "--count", "2"], "exactly one of --fraction"),
    (["units", "--fraction", "1.5"], "'--fraction' parameter of prunelab units must be a float in [0, 1)"),
    (["units", "--fraction", "0.5", "--layers", "first_conv"], "'first_conv', but the model has no such layer"),
    (["prune", "--criterion", "magnitde"], "unknown criterion 'magnitde' (did you mean 'magnitude'?)"),
    (["prune", "--sparsity", "1.2"], "'sparsity' parameter of one-shot schedule must be a float in [0, 1). Got 1.2"),
    (["prune", "--dataset", "mnsit"], "unknown dataset 'mnsit' (did you mean 'mnist'?)"),
    (["prune", "--model", "lenet", "--dataset", "digits"], "unknown model 'lenet'"),
    (["prune", "--model-arg", "hidden"], "--model-arg takes key=value"),
    (["prune", "--finetune-epochs", "-2"], "'--finetune-epochs' parameter of prunelab prune must be an int"),
    (["prune", "--granularity", "kernel"], "granularity 'kernel' applies only to Conv layers"),
    (["prune", "--schedule", "iterative", "--schedule-arg", "n_prunes=9", "--finetune-epochs", "3"],
     "the schedule's last prune is at step 184 but fine-tuning has 69 steps"),
])
def test_cli_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunelab: error: ") and message in err
    assert err.count("\n") == 1


SPECS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_the_shipped_specs_are_all_there():
    assert [p.stem for p in SPECS] == ["quickstart", "study-a-select-training", "study-a-select", "study-a",
                                       "study-b", "study-c", "study-d-conv", "study-d", "study-e"]


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_shipped_specs_validate(path, quick, capsys):
    _skip_without_data(path)
    assert main(["run", str(path), "--dry-run"] + (["--quick"] if quick else [])) == 0
    assert capsys.readouterr().out.startswith(f"study {path.stem}: ")


def _skip_without_data(path):
    needs = {"quickstart": None, "study-b": "fashion-mnist"}.get(path.stem, "mnist")
    if needs and DATASETS.get(needs).missing_files():
        pytest.skip(f"{needs} files absent (set PRUNELAB_DATA)")


STUDIES = [p for p in SPECS if p.stem.startswith("study-")]
# --quick, on even fewer images, so that the six studies take about a minute together
TINY = ["--set", "datasets.0.subset.n_train=400", "--set", "datasets.0.subset.n_test=200"]
TINY_EXTRA = {"study-a-select": ["--set", "datasets.0.validation=100"],
              "study-a-select-training": ["--set", "datasets.0.validation=100"],
              "study-b": ["--set", "methods.1.calibration=200", "--set", "methods.1.finetune_steps=3",
                          "--set", "methods.0.sets.1.finetune_steps=[3]", "--set", "methods.0.every=5"]}


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_each_shipped_study_runs_in_quick_mode_and_makes_its_tables_and_figures(path, tmp_path, capsys):
    import yaml

    _skip_without_data(path)
    argv = ["run", str(path), "--quick", *TINY, *TINY_EXTRA.get(path.stem, []), "--out", str(tmp_path),
            "--no-progress", "--report"]
    assert main(argv) == 0, capsys.readouterr().err
    folder = tmp_path / f"{path.stem}-quick"
    outputs = yaml.safe_load(path.read_text()).get("outputs", {})
    tables = list((folder / "tables").glob("*.csv"))
    figures = list((folder / "figures").glob("*.png"))
    assert tables and len(tables) >= len(outputs.get("tables", [{}]))
    assert len(figures) >= len(outputs.get("figures", []))
    assert (folder / "study_report.html").stat().st_size > 1000


def test_quickstart_quick_runs_and_prints_its_tables(tmp_path, capsys):
    code = main(["run", str(SPECS[0]), "--quick", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| sparsity |" in out and "one-shot" in out and "iterative" in out
    assert (tmp_path / "quickstart-quick" / "study.db").is_file()
    assert list((tmp_path / "quickstart-quick" / "tables").glob("*.md"))

