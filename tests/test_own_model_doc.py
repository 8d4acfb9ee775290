"""docs/own-model.md runs as written: its Python blocks in order, its `prunelab` commands in-process."""

from __future__ import annotations

import re
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from prunelab.cli import main

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own-model.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(PAGE.read_text()) if lang == language]


def test_the_page_has_the_three_models_and_the_cli():
    python = _blocks("python")
    assert len(python) == 4 and len(_blocks("bash")) == 1
    assert "units.remove_units(gpt2" in python[1] and "def gpt2" in python[3]
    assert "class Block" in python[0] and "GPT2LMHeadModel" in python[1] and "nn.LSTM" in python[2]


def test_the_python_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "own_model_doc"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied lm_head note, exporter notices
        for block in _blocks("python")[:3]:
            exec(compile(block, str(PAGE), "exec"), namespace)
    assert (tmp_path / "resnet.plm").is_file() and (tmp_path / "gpt2.onnx").is_file()
    assert namespace["report"].replaced == ["decoder"]


def test_the_commands_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx")
    module = _blocks("python")[3]
    assert module.startswith("# my_models.py")
    (tmp_path / "my_models.py").write_text(module)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models", None)
    lines = [line for line in _blocks("bash")[0].splitlines() if line.startswith("prunelab ")]
    assert len(lines) == 6
    pytest.importorskip("transformers")
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, line
    assert (tmp_path / "cnn.onnx").is_file()
    assert "transformer.h.0.attn:heads 4->3, transformer.h.0.mlp 128->96" in capsys.readouterr().out
    import my_models

    import prunelab

    assert prunelab.load(tmp_path / "gpt2-small.plm", model=my_models.gpt2()).transformer.h[1].attn.num_heads == 3
    sys.modules.pop("my_models", None)
