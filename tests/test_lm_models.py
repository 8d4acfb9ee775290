"""The registry's language models, ``gpt`` and ``lstm-lm``: shapes, parameter counts by hand,
causality, errors, units, save/load, and a few training steps on a slice of pydocs."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch
from torch import nn

import prunelab
from prunelab import units
from prunelab.data import TextDataset, load_dataset, text
from prunelab.models import build_model, model_options

V, T = 40, 10
SMALL = {"gpt": {"d_model": 16, "n_layers": 2, "n_heads": 4}, "lstm-lm": {"d_model": 16}}


def ids(n: int = 3, length: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(seed))


def small(name: str, seed: int = 0, **kw) -> nn.Module:
    return build_model(name, input_shape=(T,), n_classes=V, seed=seed, **{**SMALL[name], **kw})


# -- building ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt", "lstm-lm"])
def test_forward_gives_token_logits_and_config_rebuilds_the_same_model(name):
    model = small(name)
    assert model(ids()).shape == (3, T, V)
    config = json.loads(json.dumps(model.config))
    assert config["input_shape"] == [T] and config["n_classes"] == V
    again = build_model(**config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_gpt_parameter_count_by_hand():
    d, f, L, C = 16, 24, 3, T
    block = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
    tied = build_model("gpt", input_shape=(C,), n_classes=V, d_model=d, n_layers=L, n_heads=2, d_ff=f)
    assert sum(p.numel() for p in tied.parameters()) == V * d + C * d + L * block + 2 * d
    untied = build_model("gpt", input_shape=(C,), n_classes=V, d_model=d, n_layers=L, n_heads=2, d_ff=f, tied=False)
    assert sum(p.numel() for p in untied.parameters()) == V * d + C * d + L * block + 2 * d + d * V
    assert tied.lm_head.weight is tied.tok_embed.weight and untied.lm_head.weight is not untied.tok_embed.weight
    assert model_options("gpt") == {
        "d_model": 128,
        "n_layers": 4,
        "n_heads": 4,
        "d_ff": None,
        "dropout": 0.0,
        "tied": True,
    }


def test_lstm_lm_parameter_count_by_hand():
    d, L = 16, 2
    model = small("lstm-lm", n_layers=L)
    lstm = sum(4 * d * (d + d + 2) for _ in range(L))
    assert sum(p.numel() for p in model.parameters()) == V * d + lstm + d * V + V
    tied = small("lstm-lm", tied=True)
    assert tied.decoder.weight is tied.embed.weight


@pytest.mark.parametrize("name", ["gpt", "lstm-lm"])
def test_a_token_only_changes_the_logits_from_its_position_on(name):
    model = small(name).eval()
    x = ids(2)
    changed = x.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])


def test_build_from_a_text_dataset_takes_its_vocabulary_and_length():
    x = ids(4)
    ds = TextDataset("t", x, x, x, x, vocab_size=V)
    model = build_model("gpt", dataset=ds, **SMALL["gpt"])
    assert (model.vocab, model.context) == (V, T) and model.config["input_shape"] == [T]


@pytest.mark.parametrize(
    "name, kwargs, error, message",
    [
        ("gpt", {"input_shape": (1, 28, 28)}, ValueError, r"'input_shape' parameter of gpt must be \(context,\)"),
        ("gpt", {"n_heads": 3}, ValueError, "'n_heads' parameter of gpt must divide d_model=16"),
        ("gpt", {"dropout": 1.0}, ValueError, "'dropout' parameter of gpt"),
        ("gpt", {"tied": 1}, TypeError, "'tied' parameter of gpt"),
        ("lstm-lm", {"n_layers": 0}, ValueError, "'n_layers' parameter of lstm-lm"),
        ("lstm-lm", {"input_shape": (3, 8)}, ValueError, "'input_shape' parameter of lstm-lm"),
    ],
)
def test_bad_options(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        build_model(name, **{"input_shape": (T,), "n_classes": V, **SMALL[name], **kwargs})


@pytest.mark.parametrize("name", ["gpt", "lstm-lm"])
def test_float_inputs_are_refused_with_the_fix(name):
    with pytest.raises(TypeError, match=rf"{name} takes token ids.*torch.float32.*example_inputs"):
        small(name)(torch.zeros(2, T))


def test_gpt_refuses_sequences_longer_than_its_context():
    with pytest.raises(ValueError, match=f"11 tokens, more than the model's context of {T}"):
        small("gpt")(ids(1, T + 1))


# -- prunelab on them ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt", "lstm-lm"])
def test_summary_counts_parameters_and_flops(name):
    model = small(name)
    stats = prunelab.summary(model, (T,), dtype=torch.long)
    assert stats.total.params == sum(p.numel() for p in model.parameters())
    same = prunelab.summary(model, example_inputs=ids(1))
    assert same.total.flops == stats.total.flops > 2 * T * 16 * V  # at least the head's product


def test_dataset_batches_give_the_next_token_loss():
    from prunelab.data import sequences

    x, y = sequences(ids(1, 41).flatten(), T)  # 4 windows and their next tokens
    model = small("gpt").eval()
    with torch.no_grad():
        logits = model(x)
        aligned = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        inferred = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    result = prunelab.evaluate(model, (x, y), batch_size=3)
    assert result["loss"] == pytest.approx(float(aligned), rel=1e-5) and result["tokens"] == 4 * T
    assert result["perplexity"] == pytest.approx(math.exp(float(aligned)), rel=1e-5)
    alone = prunelab.evaluate(model, [x])  # inputs only: default_loss shifts them
    assert alone["loss"] == pytest.approx(float(inferred), rel=1e-5) and alone["tokens"] == 4 * (T - 1)


def test_units_find_every_head_and_mlp_channel_and_thinning_equals_masking():
    model = small("gpt", d_ff=20).eval()
    found = units.Units.of(model, example_inputs=ids(2))
    assert {(g.name, g.n_units) for g in found.layers} == {
        ("blocks.0.attn:heads", 4),
        ("blocks.0.mlp", 20),
        ("blocks.1.attn:heads", 4),
        ("blocks.1.mlp", 20),
    }
    plan = {"blocks.0.attn:heads": torch.tensor([1]), "blocks.1.mlp": torch.tensor([0, 7, 19])}
    thinned = units.thin(model, plan, example_inputs=ids(2)).eval()
    masked = small("gpt", d_ff=20).eval()  # same seed: same weights
    with torch.no_grad():
        masked.blocks[0].attn.o_proj.weight[:, 4:8] = 0  # head 1 of 4 (head_dim 4) adds nothing
        masked.blocks[1].mlp.fc2.weight[:, [0, 7, 19]] = 0  # the channels add nothing
    assert thinned.blocks[0].attn.q_proj.out_features == 12 and thinned.blocks[1].mlp.fc1.out_features == 17
    with torch.no_grad():
        torch.testing.assert_close(thinned(ids()), masked(ids()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt", "lstm-lm"])
def test_pruned_model_saves_and_loads_to_identical_outputs(tmp_path, name):
    model = small(name)
    if name == "gpt":  # the tied head is the embedding's table
        with pytest.warns(UserWarning, match="lm_head.weight is tied to an embedding"):
            prunelab.prune(model, 0.5, scope="global")
    else:
        prunelab.prune(model, 0.5, scope="global")
    prunelab.save(model, tmp_path / "lm.plm")
    back = prunelab.load(tmp_path / "lm.plm")
    with torch.no_grad():
        assert torch.equal(back.eval()(ids()), model.eval()(ids()))
    assert prunelab.summary(back, example_inputs=ids(1)).total.sparsity == pytest.approx(0.5, abs=0.01)


# -- training on pydocs -------------------------------------------------------------------------
# $PRUNELAB_DATA (read at import, before fixtures unset it), else the shared folder beside a checkout
REAL = os.environ.get("PRUNELAB_DATA") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="module")
def pydocs_slice(tmp_path_factory):
    """The first 120 kB of pydocs' train split and 30 kB of its valid split, tokenized (vocab 512)."""
    source = os.path.join(REAL, "pydocs")
    if not os.path.isfile(os.path.join(source, "train.txt")):
        pytest.skip("pydocs is not under PRUNELAB_DATA")
    root = tmp_path_factory.mktemp("slice")
    (root / "pydocs").mkdir()
    sizes = {"train": 120_000, "valid": 30_000, "test": 30_000}
    md5 = {}
    for split, n in sizes.items():
        with open(os.path.join(source, f"{split}.txt"), "rb") as f:
            data = f.read(n)
        (root / "pydocs" / f"{split}.txt").write_bytes(data)
        md5[f"{split}.txt"] = hashlib.md5(data).hexdigest()
    mp = pytest.MonkeyPatch()
    mp.setenv("PRUNELAB_CACHE", str(root / "cache"))
    for key, value in md5.items():
        mp.setitem(text.PYDOCS_MD5, key, value)
    try:
        yield load_dataset("pydocs", root=root, vocab_size=512, seq_len=32)
    finally:
        mp.undo()


@pytest.mark.data
@pytest.mark.parametrize(
    "name, options, lr",
    [
        ("gpt", {"d_model": 32, "n_layers": 2, "n_heads": 4}, 3e-3),
        ("lstm-lm", {"d_model": 48}, 1e-2),
    ],
)
def test_a_few_steps_on_pydocs_lower_the_validation_perplexity(pydocs_slice, name, options, lr):
    ds = pydocs_slice.subset(n_train=256, n_val=64, seed=0)
    model = build_model(name, dataset=ds, seed=0, **options)
    before = prunelab.evaluate(model, ds.val)["perplexity"]
    assert before == pytest.approx(ds.vocab_size, rel=0.5)  # untrained: near uniform
    history = prunelab.fit(model, ds, epochs=2, batch_size=16, lr=lr, optimizer="adam", progress=False)
    after = prunelab.evaluate(model, ds.val)
    assert after["perplexity"] < 0.6 * before and after["tokens"] == 64 * 32
    assert math.exp(history[-1]["val_loss"]) == pytest.approx(after["perplexity"], rel=1e-6)  # fit used ds.val
