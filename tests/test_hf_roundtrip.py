"""Hugging Face round trip: pruned and uniformly thinned GPT-2, LLaMA (grouped-query attention) and
BERT saved with prunelab.save_pretrained load back with from_pretrained to identical outputs;
non-uniform thinning falls back to a prunelab model file that prunelab.load rebuilds."""

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from zoo import BY_NAME, HAS_TRANSFORMERS

import prunelab
from prunelab import units
from prunelab.hf import NotStockWarning, save_pretrained
from prunelab.inputs import as_batch, logits_of

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
NAMES = ["hf-gpt2", "hf-llama", "hf-bert"]
_BUILT = {}


def built(name):
    """One model and its batches per zoo entry (importing transformers takes seconds)."""
    if name not in _BUILT:
        z = BY_NAME[name]
        _BUILT[name] = (z.build(), z.batches(2, batch=4))
    model, data = _BUILT[name]
    return copy.deepcopy(model), data


def auto_class(name):
    import transformers as T

    return T.AutoModelForSequenceClassification if name == "hf-bert" else T.AutoModelForCausalLM


def outputs(model, data):
    with torch.no_grad():
        return logits_of(as_batch(data[1], where="test").call(model.eval()))


def reload_hf(name, directory):
    return auto_class(name).from_pretrained(str(directory)).eval()


def thinned(name, layers, fraction=0.5):
    model, data = built(name)
    found = units.Units.of(model, example_inputs=BY_NAME[name].example)
    chosen = [g.name for g in found.groups if layers(g)]
    result = units.remove_units(model, "abs_mrs", data, fraction=fraction, layers=chosen, units=found)
    return units.thin(model, result), data


def saved_config(directory):
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_a_pruned_model_reloads_with_from_pretrained_and_its_zeros(name, tmp_path):
    from safetensors.torch import load_file

    model, data = built(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: the tied lm_head is left out
        pruner = prunelab.prune(model, 0.5, criterion="magnitude")
    report = save_pretrained(model, tmp_path)
    assert report.format == "huggingface" and report.config_changes == {}
    torch.testing.assert_close(outputs(reload_hf(name, tmp_path), data), outputs(model, data), atol=0, rtol=0)
    stored = load_file(str(tmp_path / "model.safetensors"))
    target = pruner.targets[0]
    key = next(k for k, v in model.state_dict().items() if v.data_ptr() == target.weight.data_ptr())
    assert torch.equal(stored[key], target.weight.detach())
    assert (stored[key] == 0).float().mean() == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(
    "name, key", [("hf-gpt2", "n_inner"), ("hf-llama", "intermediate_size"), ("hf-bert", "intermediate_size")]
)
def test_uniformly_thinned_mlps_reload_with_an_updated_config(name, key, tmp_path):
    small, data = thinned(name, lambda g: g.kind == "dense")
    report = save_pretrained(small, tmp_path)
    assert report.format == "huggingface" and report.config_changes == {key: 16}
    assert saved_config(tmp_path)[key] == 16
    expected = outputs(small, data)
    torch.testing.assert_close(outputs(reload_hf(name, tmp_path), data), expected, atol=0, rtol=0)
    torch.testing.assert_close(outputs(prunelab.load(tmp_path), data), expected, atol=0, rtol=0)


def test_a_tied_lm_head_is_stored_once_and_tied_again(tmp_path):
    from safetensors.torch import load_file

    small, data = thinned("hf-gpt2", lambda g: g.kind == "dense")
    assert small.lm_head.weight is small.transformer.wte.weight
    save_pretrained(small, tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    back = reload_hf("hf-gpt2", tmp_path)
    assert back.lm_head.weight is back.transformer.wte.weight
    untied, _ = built("hf-gpt2")  # an untied copy stays untied
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone() * 2)
    save_pretrained(untied, tmp_path / "untied")
    assert saved_config(tmp_path / "untied")["tie_word_embeddings"] is False
    torch.testing.assert_close(
        outputs(reload_hf("hf-gpt2", tmp_path / "untied"), data), outputs(untied, data), atol=0, rtol=0
    )


@pytest.mark.parametrize("group, heads, kv", [(":heads", 2, 2), (":kv_heads", 2, 1)])
def test_llama_with_grouped_query_heads_removed_reloads(group, heads, kv, tmp_path):
    small, data = thinned("hf-llama", lambda g: g.name.endswith(group) or g.kind == "dense")
    report = save_pretrained(small, tmp_path)
    assert report.format == "huggingface"
    config = saved_config(tmp_path)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (heads, kv, 4)
    assert config["intermediate_size"] == 16 and config["hidden_size"] == 16
    torch.testing.assert_close(outputs(reload_hf("hf-llama", tmp_path), data), outputs(small, data), atol=0, rtol=0)


@pytest.mark.parametrize("name, stack", [("hf-llama", "model.layers"), ("hf-gpt2", "transformer.h")])
def test_removed_blocks_give_fewer_hidden_layers(name, stack, tmp_path):
    model, data = built(name)
    del model.get_submodule(stack)[0]
    report = save_pretrained(model, tmp_path)
    assert report.format == "huggingface" and report.config_changes["num_hidden_layers"] == 1
    back = reload_hf(name, tmp_path)
    assert len(back.get_submodule(stack)) == 1
    torch.testing.assert_close(outputs(back, data), outputs(model, data), atol=0, rtol=0)


def test_torch_prune_masks_are_folded_into_the_weights(tmp_path):
    model, data = built("hf-llama")
    layer = model.model.layers[0].mlp.up_proj
    torch_prune.l1_unstructured(layer, "weight", amount=0.5)
    assert "model.layers.0.mlp.up_proj.weight_orig" in model.state_dict()
    save_pretrained(model, tmp_path)
    back = reload_hf("hf-llama", tmp_path)
    assert torch.equal(back.model.layers[0].mlp.up_proj.weight, layer.weight.detach())
    torch.testing.assert_close(outputs(back, data), outputs(model, data), atol=0, rtol=0)


def test_non_uniform_thinning_writes_a_prunelab_file_that_load_rebuilds(tmp_path):
    small, data = thinned("hf-llama", lambda g: g.name == "model.layers.0.mlp")
    with pytest.warns(NotStockWarning, match=r"different MLP widths \(model.layers.0.mlp 16, model.layers.1.mlp 32\)"):
        report = save_pretrained(small, tmp_path)
    assert report.format == "prunelab" and sorted(p.name for p in tmp_path.iterdir()) == ["model.plm"]
    expected = outputs(small, data)
    torch.testing.assert_close(outputs(prunelab.load(tmp_path), data), expected, atol=0, rtol=0)
    torch.testing.assert_close(outputs(prunelab.load(tmp_path / "model.plm"), data), expected, atol=0, rtol=0)
    with pytest.raises((OSError, ValueError)):  # no config.json: not a transformers checkpoint
        reload_hf("hf-llama", tmp_path)


@pytest.mark.parametrize("name", ["hf-gpt2", "hf-bert"])
def test_heads_of_a_config_without_head_dim_fall_back_to_a_prunelab_file(name, tmp_path):
    small, data = thinned(name, lambda g: g.kind == "heads")
    with pytest.warns(NotStockWarning, match="has no head_dim: its heads are hidden_size / num_attention_heads wide"):
        report = save_pretrained(small, tmp_path)
    assert report.format == "prunelab"
    back = prunelab.load(tmp_path)
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in small.parameters())
    torch.testing.assert_close(outputs(back, data), outputs(small, data), atol=0, rtol=0)


def test_fallback_false_refuses_and_writes_nothing(tmp_path):
    small, _ = thinned("hf-llama", lambda g: g.name == "model.layers.1.mlp")
    with pytest.raises(
        ValueError,
        match=r"cannot be described by a stock LlamaConfig: non-uniform thinning.*"
        r"fallback=True",
    ):
        save_pretrained(small, tmp_path / "out", fallback=False)
    assert not (tmp_path / "out").exists()


def test_a_later_save_replaces_the_other_format(tmp_path):
    uniform, data = thinned("hf-llama", lambda g: g.kind == "dense")
    non_uniform, _ = thinned("hf-llama", lambda g: g.name == "model.layers.0.mlp")
    save_pretrained(uniform, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotStockWarning)
        save_pretrained(non_uniform, tmp_path)
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "model.safetensors").exists()
    save_pretrained(uniform, tmp_path)
    assert not (tmp_path / "model.plm").exists()
    torch.testing.assert_close(outputs(prunelab.load(tmp_path), data), outputs(uniform, data), atol=0, rtol=0)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(
        TypeError,
        match="'model' parameter of save_pretrained must be a transformers PreTrainedModel.*Got Linear instead",
    ):
        save_pretrained(nn.Linear(2, 2), tmp_path)
    model, _ = built("hf-llama")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="'directory' parameter of save_pretrained is a file"):
        save_pretrained(model, tmp_path / "file")
    with pytest.raises(ValueError, match="holds neither model.plm nor config.json"):
        prunelab.load(tmp_path)


def test_prunelab_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import prunelab, torch\n"
        "try:\n    prunelab.save_pretrained(torch.nn.Linear(2, 2), 'x')\n"
        "except ImportError as err:\n    print('refused:', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: save_pretrained needs the 'transformers' package" in done.stdout


def test_bfloat16_models_come_back_in_bfloat16_in_both_formats(tmp_path):
    uniform, data = thinned("hf-llama", lambda g: g.kind == "dense")
    non_uniform, _ = thinned("hf-llama", lambda g: g.name == "model.layers.0.mlp")
    for model, where in (
        (uniform.to(torch.bfloat16), tmp_path / "stock"),
        (non_uniform.to(torch.bfloat16), tmp_path / "plm"),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotStockWarning)
            save_pretrained(model, where)
        back = prunelab.load(where)
        assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
        torch.testing.assert_close(outputs(back, data), outputs(model, data), atol=0, rtol=0)
    assert saved_config(tmp_path / "stock")["dtype"] == "bfloat16"


def test_a_fallback_file_keeps_the_depth_of_a_model_with_blocks_removed(tmp_path):
    small, data = thinned("hf-gpt2", lambda g: g.kind == "heads")
    del small.transformer.h[0]
    with pytest.warns(NotStockWarning):
        save_pretrained(small, tmp_path)
    back = prunelab.load(tmp_path)
    assert len(back.transformer.h) == 1
    torch.testing.assert_close(outputs(back, data), outputs(small, data), atol=0, rtol=0)


class _Skip(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_a_model_whose_layout_no_config_builds_is_refused_before_writing(tmp_path):
    model, _ = built("hf-llama")
    model.model.layers[1] = _Skip()
    with pytest.raises(
        ValueError,
        match=r"fits neither a stock config nor a prunelab model file.*missing "
        r"\['model.layers.1.*prunelab.save\(model, 'model.plm'\)",
    ):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
