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
    for line in [
        "criteria: gradient (gradient-magnitude), lobs (l-obs), magnitude, obd, obs-exact (obs_exact), obs-fast (obs_fast), random",
        "scopes: global, layerwise-constant (layerwise_constant), local (layerwise)",
        "granularities: channel, filter (unit), kernel, weight (unstructured)",
    ]:
        assert line in out
    assert "lenet5" in out and "digits" in out


def test_prune_command_trains_prunes_and_saves(tmp_path, capsys):
    save_path, json_path = tmp_path / "m" / "model.pt", tmp_path / "r.json"
    code = main(
        [
            "prune",
            "--dataset",
            "digits",
            "--model",
            "mlp",
            "--model-arg",
            "hidden=[32]",
            "--sparsity",
            "0.8",
            "--scope",
            "global",
            "--schedule",
            "agp",
            "--schedule-arg",
            "n_prunes=3",
            "--epochs",
            "3",
            "--finetune-epochs",
            "4",
            "--save",
            str(save_path),
            "--json",
            str(json_path),
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads(json_path.read_text())
    assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert result["accuracy_final"] > 0.5
    saved = torch.load(save_path, weights_only=True)
    assert saved["config"]["hidden"] == [32]
    capsys.readouterr()
    assert (
        main(
            [
                "summary",
                "--model",
                "mlp",
                "--dataset",
                "digits",
                "--model-arg",
                "hidden=[32]",
                "--weights",
                str(save_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    # read back from the file: local 80 % of fc1 (2048 weights → 1638 pruned) and fc2 (320 → 256)
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert f"{100 * (1638 + 256) / 2368:.2f}" in total_line


def test_units_command_removes_thins_measures_and_saves(tmp_path, capsys):
    save_path, json_path = tmp_path / "thin.pt", tmp_path / "r.json"
    code = main(
        [
            "units",
            "--model-arg",
            "hidden=[40,20]",
            "--epochs",
            "15",
            "--method",
            "bp_norm",
            "--fraction",
            "0.25",
            "--latency",
            "--threads",
            "1",
            "--save",
            str(save_path),
            "--json",
            str(json_path),
            "--quiet",
        ]
    )
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
    assert (
        main(
            [
                "summary",
                "--model",
                "mlp",
                "--dataset",
                "digits",
                "--model-arg",
                "hidden=[40,20]",
                "--weights",
                str(save_path),
            ]
        )
        == 0
    )
    total_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert f"{expected:,}" in total_line


@pytest.mark.parametrize(
    "argv,message",
    [
        (["units", "--method", "bp_nrom", "--fraction", "0.5"], "bp_nrom"),
        (["units", "--fraction", "0.5", "--count", "2"], "exactly one of --fraction"),
        (["units", "--fraction", "1.5"], "'--fraction' parameter of prunelab units must be a float in [0, 1)"),
        (["units", "--fraction", "0.5", "--layers", "first_conv"], "'first_conv', but the model has no such layer"),
        (["prune", "--criterion", "magnitde"], "unknown criterion 'magnitde' (did you mean 'magnitude'?)"),
        (["prune", "--sparsity", "1.2"], "'--sparsity' parameter of prunelab prune must be a float in [0, 1). Got 1.2"),
        (["prune", "--dataset", "mnsit"], "unknown dataset 'mnsit' (did you mean 'mnist'?)"),
        (["prune", "--model", "lenet", "--dataset", "digits"], "unknown model 'lenet'"),
        (["prune", "--model-arg", "hidden"], "--model-arg takes key=value"),
        (["prune", "--finetune-epochs", "-2"], "'--finetune-epochs' parameter of prunelab prune must be an int"),
        (["prune", "--granularity", "kernel"], "granularity 'kernel' applies only to Conv layers"),
        (
            ["prune", "--schedule", "iterative", "--schedule-arg", "n_prunes=9", "--finetune-epochs", "3"],
            "the schedule's last prune is at step 184 but fine-tuning has 69 steps",
        ),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunelab: error: ") and message in err
    assert err.count("\n") == 1


SPECS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_the_shipped_specs_are_all_there():
    assert [p.stem for p in SPECS] == [
        "quickstart",
        "study-a-h30-levels",
        "study-a-long-select",
        "study-a-long",
        "study-a-select-training",
        "study-a-select",
        "study-a-split",
        "study-a",
        "study-b-paper",
        "study-b",
        "study-c-paper",
        "study-c",
        "study-d-conv",
        "study-d",
        "study-e-equal",
        "study-e-latency",
        "study-e",
        "study-f-quick",
        "study-f",
    ]


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
def test_shipped_specs_validate(path, quick, capsys):
    _skip_without_data(path)
    assert main(["run", str(path), "--dry-run"] + (["--quick"] if quick else [])) == 0
    assert capsys.readouterr().out.startswith(f"study {path.stem}: ")


def _skip_without_data(path):
    needs = {
        "quickstart": None,
        "study-b": "fashion-mnist",
        "study-b-paper": "fashion-mnist",
        "study-f-quick": "pydocs",
        "study-f": "pydocs",
    }.get(path.stem, "mnist")
    if needs and DATASETS.get(needs).missing_files():
        pytest.skip(f"{needs} files absent (set PRUNELAB_DATA)")


# language models on pydocs take minutes per run even in quick mode: tests/test_lm_study.py runs a tiny LM study
SLOW_STUDIES = {"study-f-quick", "study-f"}
STUDIES = [p for p in SPECS if p.stem.startswith("study-") and p.stem not in SLOW_STUDIES]


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_each_shipped_study_runs_in_quick_mode_and_makes_its_tables_and_figures(path, tmp_path, capsys):
    import yaml

    _skip_without_data(path)
    # each spec's quick: section is a smoke run of seconds (400 images, 1 seed, a subset of the grid)
    argv = ["run", str(path), "--quick", "--out", str(tmp_path), "--no-progress", "--report"]
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


# --------------------------------------------------------------------------- your own model

USER_MODELS = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def net(hidden=16):
    torch.manual_seed(0)
    return Net(hidden)


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 20)

    def forward(self, input_ids, attention_mask):
        return {"logits": self.fc(self.embed(input_ids)) * attention_mask[..., None]}


def tokens():
    torch.manual_seed(0)
    return Tokens()


class TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 20)

    def forward(self, input_ids, attention_mask):
        return {"logits": self.fc2(torch.relu(self.fc1(self.embed(input_ids)))) * attention_mask[..., None]}


def token_mlp():
    torch.manual_seed(0)
    return TokenMLP()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=4, n_inner=32,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)).eval()


def broken():
    raise RuntimeError("weights missing")


def not_a_model():
    return 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``user_models_cli`` importable from the current directory, as a user's would be."""
    import sys

    (tmp_path / "user_models_cli.py").write_text(USER_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_models_cli", None)
    yield "user_models_cli"
    sys.modules.pop("user_models_cli", None)


def test_prune_a_user_model_and_load_the_file_back(user_module, tmp_path, capsys):
    import importlib

    import prunelab

    code = main(
        [
            "prune",
            "--model",
            f"{user_module}:net",
            "--model-arg",
            "hidden=12",
            "--example-input",
            "float:1x3x4x4",
            "--sparsity",
            "0.75",
            "--export",
            "pruned.plm",
            "--json",
            "r.json",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "total" in out and "one-shot magnitude" in out
    assert json.loads((tmp_path / "r.json").read_text())["sparsity"] == pytest.approx(0.75, abs=0.01)
    model = prunelab.load(tmp_path / "pruned.plm", model=importlib.import_module(user_module).net(12))
    for layer in (model.conv, model.fc1, model.fc2):
        assert (layer.weight == 0).float().mean() == pytest.approx(0.75, abs=0.02)


def test_units_thins_a_user_model_and_the_file_resizes_a_fresh_one(user_module, tmp_path, capsys):
    import importlib

    import prunelab

    assert (
        main(
            [
                "units",
                "--model",
                f"{user_module}:net",
                "--example-input",
                "float:1x3x4x4",
                "--method",
                "norm",
                "--fraction",
                "0.5",
                "--layers",
                "fc1",
                "--save",
                "thin.plm",
            ]
        )
        == 0
    )
    assert "fc1 16->8" in capsys.readouterr().out
    model = prunelab.load(tmp_path / "thin.plm", model=importlib.import_module(user_module).net())
    assert model.fc1.out_features == 8 and model.fc2.in_features == 8
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 3)


def test_export_with_keyword_inputs_writes_onnx(user_module, tmp_path, capsys):
    import prunelab

    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    module = __import__(user_module)
    prunelab.save(module.tokens(), tmp_path / "t.plm")
    assert (
        main(
            [
                "export",
                "t.plm",
                "out.plm",
                "--model",
                f"{user_module}:tokens",
                "--example-input",
                "input_ids=int:2x5:0-20,attention_mask=ones:2x5",
                "--onnx",
                "t.onnx",
            ]
        )
        == 0
    )
    assert "ONNX: t.onnx" in capsys.readouterr().out
    import onnx

    assert [i.name for i in onnx.load(str(tmp_path / "t.onnx")).graph.input] == ["input_ids", "attention_mask"]


def test_summary_of_a_user_model(user_module, capsys):
    assert main(["summary", "--model", f"{user_module}:net", "--example-input", "float:1x3x4x4"]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "fc2" in out and "total" in out


TOKENS = "input_ids=int:1x6:0-20,attention_mask=ones:1x6"


def test_units_thins_a_user_model_with_keyword_inputs(user_module, tmp_path, capsys):
    import importlib

    import prunelab
    from prunelab import units

    assert (
        main(
            [
                "units",
                "--model",
                f"{user_module}:token_mlp",
                "--example-input",
                TOKENS,
                "--method",
                "norm",
                "--fraction",
                "0.5",
                "--save",
                "thin.plm",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert ":mlp 16->8" in out and "per sample of inputs {'input_ids': (6,), 'attention_mask': (6,)}" in out
    module = importlib.import_module(user_module)
    expected = module.token_mlp()  # the same removal through the Python API
    example = {"input_ids": torch.randint(0, 20, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    expected = units.thin(expected, units.remove_units(expected, "norm", fraction=0.5, example_inputs=example))
    model = prunelab.load(tmp_path / "thin.plm", model=module.token_mlp())
    assert model.fc1.out_features == 8 and model.fc2.in_features == 8
    assert torch.equal(model(**example)["logits"], expected(**example)["logits"])


def test_export_thins_the_dead_units_of_a_user_model_with_keyword_inputs(user_module, tmp_path, capsys):
    import prunelab

    module = __import__(user_module)
    model = module.token_mlp()
    with torch.no_grad():
        model.fc1.weight[[1, 4, 9]] = 0  # three dead units, whose relu(bias) stays in fc2's bias
    prunelab.save(model, tmp_path / "dead.plm")
    assert (
        main(
            [
                "export",
                "dead.plm",
                "thin.plm",
                "--thin",
                "--model",
                f"{user_module}:token_mlp",
                "--example-input",
                TOKENS,
            ]
        )
        == 0
    )
    assert "thinned: 3 units whose weights are all zero removed" in capsys.readouterr().out
    loaded = prunelab.load(tmp_path / "thin.plm", model=module.token_mlp())
    example = {"input_ids": torch.randint(0, 20, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    assert loaded.fc1.out_features == 13
    torch.testing.assert_close(loaded(**example)["logits"], model(**example)["logits"], atol=1e-6, rtol=1e-6)


def test_summary_units_and_latency_of_a_hugging_face_gpt2_from_token_ids(user_module, tmp_path, capsys):
    import prunelab
    from prunelab import units

    pytest.importorskip("transformers")
    module = __import__(user_module)
    ids = ["--model", f"{user_module}:gpt2", "--example-input", "input_ids=int:1x16:0-100"]
    assert main(["summary", *ids]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.1.attn" in out and "per sample of inputs {'input_ids': (16,)}" in out
    assert main(["units", *ids, "--method", "norm", "--count", "1", "--save", "g.plm"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.attn:heads 4->3" in out and "transformer.h.1.mlp 32->31" in out
    loaded = prunelab.load(tmp_path / "g.plm", model=module.gpt2())
    assert (loaded.transformer.h[0].attn.num_heads, loaded.transformer.h[0].attn.split_size) == (3, 12)
    expected = module.gpt2()
    tokens = torch.randint(0, 100, (2, 16))
    expected = units.thin(expected, units.remove_units(expected, "norm", count=1, example_inputs=tokens))
    assert torch.equal(loaded(tokens).logits, expected(tokens).logits)
    assert main(["summary", *ids, "--weights", "g.plm", "--latency", "--threads", "1"]) == 0
    assert "transformer.h.0.attn:heads 3->3, transformer.h.0.mlp 31->31" in capsys.readouterr().out
    assert main(["units", *ids, "--method", "rand", "--count", "2", "--layers", "transformer.h.1.attn:heads"]) == 0
    assert (
        "transformer.h.0.attn:heads 4->4, transformer.h.0.mlp 32->32, transformer.h.1.attn:heads 4->2"
        in capsys.readouterr().out
    )


X = ["--example-input", "float:1x3x4x4"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "{m}:nope", *X], "module 'user_models_cli' has no attribute 'nope'; its callables: "),
        (["--model", "no_such_module_x:net", *X], "no module named 'no_such_module_x'"),
        (["--model", "{m}:broken", *X], "broken() raised RuntimeError: weights missing"),
        (["--model", "{m}:not_a_model", *X], "not_a_model() returned a int, not a torch.nn.Module"),
        (["--model", "{m}:net", "--criterion", "obd", *X], "criterion 'obd' needs calibration data"),
        (["--model", "{m}:net", "--dataset", "digits", *X], "--dataset is for registry models"),
        (["--model", "{m}:net"], "needs --example-input, e.g. float:1x3x32x32"),
        (["--model", "mlp", "--example-input", "float:1x64"], "--example-input is for your own model"),
    ],
)
def test_user_model_mistakes_exit_2_with_one_line(user_module, capsys, argv, message):
    assert main(["prune", *(a.format(m=user_module) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("float", "not of the form [NAME=]KIND:SHAPE[:LOW-HIGH]"),
        ("floot:1x3", "unknown kind 'floot'"),
        ("float:1x0", "the shape '1x0' must be positive integers"),
        ("float:1x3:0-5", "a LOW-HIGH range is for kind int only"),
        ("int:1x3:5-5", "the range 5-5 is empty"),
        ("a=int:1x3,float:1x3", "all named (keyword inputs) or all unnamed"),
        ("a=int:1x3,a=ones:1x3", "the name 'a' is given twice"),
        ("float:100000x100000x100", "more than 67,108,864 elements"),
    ],
)
def test_example_input_mistakes_name_the_value_and_the_valid_forms(user_module, capsys, spec, message):
    assert main(["summary", "--model", f"{user_module}:net", "--example-input", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and "valid forms: float:1x3x32x32, int:1x16:0-50257" in err and err.count("\n") == 1


def test_example_input_grammar_builds_the_tensors():
    from prunelab.cli_model import make_example

    x = make_example("float:2x3", torch.float64)
    assert x.shape == (2, 3) and x.dtype == torch.float64
    a, b = make_example("int:1x4:5-7,zeros:1x2")
    assert a.dtype == torch.long and set(a.flatten().tolist()) <= {5, 6} and torch.equal(b, torch.zeros(1, 2).long())
    kw = make_example("input_ids=int:1x16:0-1000,attention_mask=ones:1x16")
    assert list(kw) == ["input_ids", "attention_mask"] and kw["attention_mask"].sum() == 16
    assert 0 <= kw["input_ids"].min() and kw["input_ids"].max() < 1000


def test_export_thins_and_writes_onnx_for_a_registry_language_model(tmp_path, monkeypatch, capsys):
    # a registry LM takes token ids: --thin and --onnx feed it ids of its input_shape, not floats
    import prunelab
    from prunelab.models import build_model

    monkeypatch.chdir(tmp_path)
    pytest.importorskip("onnxruntime")
    model = build_model("gpt", n_classes=64, input_shape=(8,), d_model=16, n_layers=1, n_heads=2, seed=0)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[[0, 5, 7]] = 0  # three dead MLP channels
        model.blocks[0].mlp.fc1.bias[[0, 5, 7]] = 0
    prunelab.save(model, "lm.plm")
    assert main(["export", "lm.plm", "thin.plm", "--thin", "--onnx", "thin.onnx"]) == 0
    out = capsys.readouterr().out
    assert "thinned: 3 units whose weights are all zero removed" in out and "ONNX: thin.onnx" in out
    thin = prunelab.load("thin.plm")
    assert thin.blocks[0].mlp.fc1.out_features == model.blocks[0].mlp.fc1.out_features - 3
    tokens = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(thin.eval()(tokens), model.eval()(tokens), atol=1e-5, rtol=1e-5)


def test_warnings_are_one_line_each_shown_once(monkeypatch, capsys):
    import warnings

    import prunelab.cli as cli
    from prunelab.pruning.targets import TiedWeightSkipped

    def noisy(args):
        for _ in range(3):  # the same message from three places, as planning a study can give
            warnings.warn("Pruner: lm_head.weight is tied to an embedding", TiedWeightSkipped, stacklevel=1)
            warnings.warn("Pruner: lm_head.weight is tied to an embedding", TiedWeightSkipped, stacklevel=2)
        warnings.warn("something torch says", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "cmd_list", noisy)
    before = warnings.showwarning
    assert main(["list"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "prunelab: warning: Pruner: lm_head.weight is tied to an embedding",
        "prunelab: warning: UserWarning: something torch says",
    ]
    assert warnings.showwarning is before  # the caller's display is back afterwards
