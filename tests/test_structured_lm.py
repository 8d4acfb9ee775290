"""Structured transformer pruning: the refit against torch.linalg.lstsq, head removal against head
masking (with grouped-query attention), block scores by hand, removed blocks against skipped
blocks, rounding, the refit lowering the output error, refusals."""

import copy

import pytest
import torch
from torch import nn
from zoo import BY_NAME, HAS_TRANSFORMERS, zoo_params

from prunelab import units
from prunelab.inputs import as_batch, logits_of
from prunelab.units import refit as lsq
from prunelab.units.transformer import kept_count

_BUILT = {}
hf_only = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")


def built(name):
    if name not in _BUILT:
        z = BY_NAME[name]
        _BUILT[name] = (z.build(), z.batches(4, batch=4), z.batches(2, seed=7, batch=4))
    return _BUILT[name]


def outputs(model, raw):
    with torch.no_grad():
        return logits_of(as_batch(raw, where="test").call(model))


def error(a, b, held):
    return sum(float((outputs(a, r) - outputs(b, r)).pow(2).mean()) for r in held)


# ------------------------------------------------------------------ the refit is least squares
def ridge(X, Y, bias, damp):
    """The ridge solution as plain least squares: rows [X; √λ I] → [Y; 0], by torch.linalg.lstsq."""
    X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1) if bias else X
    lam = damp * float((X.T @ X).diagonal().mean())
    A = torch.cat([X, lam**0.5 * torch.eye(X.shape[1], dtype=X.dtype)])
    B = torch.cat([Y, torch.zeros(X.shape[1], Y.shape[1], dtype=X.dtype)])
    return torch.linalg.lstsq(A, B).solution.T  # (out, in [+ 1])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_refit_equals_the_least_squares_solution(bias, damp):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    normal = lsq.Normal(bias)
    normal.add(X[:25].view(5, 5, 4), Y[:25].view(5, 5, 3))  # token positions of several batches
    normal.add(X[25:], Y[25:])
    layer = nn.Linear(4, 3, bias=bias).double()
    with torch.no_grad():
        cut = ((layer(X) - Y).pow(2).sum() / Y.pow(2).sum()).item()
    result = lsq.refit_layer("fc", layer, normal, damp, features=6)
    expected = ridge(X, Y, bias, damp)
    torch.testing.assert_close(layer.weight.detach(), expected[:, :4])
    if bias:
        torch.testing.assert_close(layer.bias.detach(), expected[:, 4])
    with torch.no_grad():
        after = ((layer(X) - Y).pow(2).sum() / Y.pow(2).sum()).item()
    assert result.after == pytest.approx(after, rel=1e-6, abs=1e-9)
    assert result.before == pytest.approx(cut, rel=1e-6)
    assert (result.features, result.kept) == (6, 4) and result.after <= result.before


def test_a_refit_that_does_not_lower_the_held_out_error_is_not_applied():
    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(8, 2).double()
    weight = layer.weight.detach().clone()
    fit, held_out = lsq.Normal(True), lsq.Normal(True)
    X = torch.randn(20, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        fit.add(X[:10], layer(X[:10]) + torch.randn(10, 2, generator=g, dtype=torch.float64))  # noise to overfit
        held_out.add(X[10:], layer(X[10:]))  # the layer as it is is exact here
    result = lsq.refit_layer("fc", layer, fit, 0.0, 8, held_out)
    assert not result.applied and result.held_out_after > result.held_out_before == pytest.approx(0.0, abs=1e-12)
    assert torch.equal(layer.weight.detach(), weight) and result.after == result.before


REFIT_LAYERS = [
    ("hf-llama", "model.layers.1.self_attn.o_proj", "model.layers.1.self_attn:heads", 4),
    ("hf-llama", "model.layers.1.mlp.down_proj", "model.layers.1.mlp", 1),
    ("hf-gpt2", "transformer.h.1.mlp.c_proj", "transformer.h.1.mlp", 1),
]


@hf_only
@pytest.mark.parametrize("mode", ["layerwise", "sequential"])
@pytest.mark.parametrize("name, layer, group, width", REFIT_LAYERS, ids=[r[1] for r in REFIT_LAYERS])
def test_refit_in_the_model_equals_lstsq_on_its_inputs_and_the_dense_outputs(name, layer, group, width, mode):
    model, data, _ = built(name)
    result = units.prune_transformer(model, data, heads=0.5, mlp=0.5, refit=mode, damp=0.0)
    assert next(r for r in result.refits if r.layer == layer).applied
    pruned, dense = result.model.get_submodule(layer), model.get_submodule(layer)
    removed = torch.cat([torch.arange(u * width, (u + 1) * width) for u in result.plan[group].tolist()])
    kept = torch.tensor([f for f in range(dense.weight.shape[0 if name == "hf-gpt2" else 1]) if f not in removed])
    X, Y = [], []
    if mode == "sequential":  # earlier layers are final when this one is refit: its inputs are these
        h1 = pruned.register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    else:  # the unpruned layer's inputs, its kept features
        h1 = dense.register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, a[0].shape[-1])[:, kept].double()))
    h2 = dense.register_forward_hook(lambda m, a, o: Y.append(o.reshape(-1, o.shape[-1]).double()))
    for raw in data:
        outputs(result.model, raw)
        outputs(model, raw)
    h1.remove(), h2.remove()
    expected = ridge(torch.cat(X), torch.cat(Y), getattr(pruned, "bias", None) is not None, 0.0)
    weight = pruned.weight.detach().double()
    weight = weight.T if name == "hf-gpt2" else weight
    torch.testing.assert_close(weight, expected[:, : weight.shape[1]].to(weight.dtype), atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------ heads: removal == masking
def _head_columns(result, group, head_dim, per_kv):
    removed = result.plan[group]
    if group.endswith(":kv_heads"):
        removed = torch.cat([torch.arange(k * per_kv, (k + 1) * per_kv) for k in removed.tolist()])
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in removed.tolist()])


HEADS = [
    ("hf-llama", "query", "model.layers.{}.self_attn", "o_proj", 4, 2),
    ("hf-llama", "kv", "model.layers.{}.self_attn", "o_proj", 4, 2),
    ("hf-gpt2", "query", "transformer.h.{}.attn", "c_proj", 4, 1),
    ("hf-bert", "query", "bert.encoder.layer.{}.attention.self", "../output.dense", 4, 1),
    ("hf-vit", "query", "vit.layers.{}.attention", "o_proj", 4, 1),
]


@hf_only
@pytest.mark.parametrize("name, gqa, attention, o_name, head_dim, per_kv", HEADS, ids=[f"{h[0]}-{h[1]}" for h in HEADS])
def test_head_removal_equals_head_masking(name, gqa, attention, o_name, head_dim, per_kv):
    model, data, held = built(name)
    result = units.prune_transformer(model, data, heads=0.5, gqa=gqa, refit=False)
    reference = copy.deepcopy(model)
    kind = "kv_heads" if gqa == "kv" else "heads"
    for layer in range(2):
        owner = attention.format(layer)
        o_path = owner.rsplit(".", 1)[0] + "." + o_name[3:] if o_name.startswith("../") else f"{owner}.{o_name}"
        columns = _head_columns(result, f"{owner}:{kind}", head_dim, per_kv)
        assert len(columns) == 8  # half of 16 features

        def mask(module, args, columns=columns):  # head masking: the heads' outputs become 0
            x = args[0].clone()
            x[..., columns] = 0
            return (x, *args[1:])

        reference.get_submodule(o_path).register_forward_pre_hook(mask)
    for raw in held:
        torch.testing.assert_close(outputs(result.model, raw), outputs(reference, raw), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())


@hf_only
def test_gqa_query_mode_keeps_the_key_value_heads_and_kv_mode_removes_them():
    model, data, _ = built("hf-llama")
    query = units.prune_transformer(model, data, heads=0.5, refit=False).model.model.layers[0].self_attn
    assert (query.q_proj.out_features, query.k_proj.out_features, query.num_key_value_groups) == (8, 8, 1)
    kv = units.prune_transformer(model, data, heads=0.5, gqa="kv", refit=False).model.model.layers[0].self_attn
    assert (kv.q_proj.out_features, kv.k_proj.out_features, kv.num_key_value_groups) == (8, 4, 2)


def test_multihead_attention_heads_are_refused_naming_the_layer():
    model, data, held = built("transformer")
    with pytest.raises(ValueError, match=r"encoder\.layers\.0\.self_attn:heads.*num_heads × head_dim"):
        units.prune_transformer(model, data, heads=0.25)
    small = units.prune_transformer(model, data, mlp=0.5, refit=False).model
    assert small.encoder.layers[0].linear1.out_features == 16


# ------------------------------------------------------------------ refit lowers the error
@pytest.mark.parametrize("z", zoo_params(["hf-llama", "hf-gpt2", "hf-bert", "hf-vit", "transformer"]))
def test_refit_lowers_the_output_error(z):
    model, data, held = built(z.name)
    heads = 0.0 if z.name == "transformer" else 0.5
    plain = units.prune_transformer(model, data, heads=heads, mlp=0.5, refit=False).model
    refit = units.prune_transformer(model, data, heads=heads, mlp=0.5, refit=True)
    assert error(model, refit.model, held) < error(model, plain, held)
    assert all(r.after <= r.before + 1e-9 for r in refit.refits) and len(refit.refits) == (4 if heads else 2)


@hf_only
def test_removed_block_refit_lowers_the_output_error():
    model, _, held = built("hf-llama")
    data = BY_NAME["hf-llama"].batches(16, batch=8)  # 1024 tokens for a 32 × 16 down_proj: no overfitting
    plain = units.prune_transformer(model, data, blocks=[1], refit=False).model
    refit = units.prune_transformer(model, data, blocks=[1], refit=True)
    assert [r.layer for r in refit.refits] == ["model.layers.0.mlp.down_proj"]
    assert error(model, refit.model, held) < error(model, plain, held)


@hf_only
def test_post_norm_blocks_are_not_refit_and_say_why():
    model, data, _ = built("hf-bert")
    result = units.prune_transformer(model, data, blocks=[1])
    assert "does not add straight into the output of block 0" in result.notes["block 1"]
    assert result.refits == []


# ------------------------------------------------------------------ scores
@hf_only
def test_energy_scores_by_hand_and_the_lowest_go():
    model, data, _ = built("hf-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = units.prune_transformer(model, data, mlp=0.25, refit=False)
    down = model.model.layers[1].mlp.down_proj
    X = []
    handle = down.register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, 32).double()))
    for raw in data:
        outputs(model, raw)
    handle.remove()
    hand = down.weight.detach().double().pow(2).sum(0) * torch.cat(X).pow(2).mean(0)
    lowest = torch.sort(torch.argsort(hand)[:8]).values
    assert torch.equal(result.plan["model.layers.1.mlp"], lowest)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched


@hf_only
def test_a_gradient_scorer_can_rank_the_units():
    model, data, held = built("hf-llama")
    result = units.prune_transformer(model, data, heads=0.5, mlp=0.5, scorer="abs_mrs", refit=False)
    scores = units.score_units(model, "abs_mrs", data, layers=["model.layers.0.mlp"])["model.layers.0.mlp"]
    assert torch.equal(result.plan["model.layers.0.mlp"], torch.sort(torch.argsort(scores, stable=True)[:16]).values)


# ------------------------------------------------------------------ blocks
@hf_only
def test_block_scores_are_one_minus_cosine_of_input_and_output():
    model, data, _ = built("hf-llama")
    result = units.prune_transformer(model, data, blocks=1, refit=False)
    total = count = 0
    for raw in data:
        with torch.no_grad():
            hidden = model(**raw, output_hidden_states=True).hidden_states  # [0] is block 0's input
        a, b = hidden[0].reshape(-1, 16).double(), hidden[1].reshape(-1, 16).double()
        total += float((1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).sum())
        count += len(a)
    assert float(result.block_scores[0]) == pytest.approx(total / count, rel=1e-6)
    assert result.removed_blocks == [int(torch.argmin(result.block_scores))]


@pytest.mark.parametrize("z", zoo_params(["hf-llama", "hf-gpt2", "hf-bert", "hf-vit", "transformer"]))
def test_removing_a_block_equals_skipping_it(z):
    model, data, held = built(z.name)
    result = units.prune_transformer(model, data, blocks=[0], refit=False)
    reference = copy.deepcopy(model)
    layers = reference.get_submodule(result.stack)

    def skip(module, args, kwargs, output):
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("src"))
        return hidden if torch.is_tensor(output) else (hidden, *output[1:])

    layers[0].register_forward_hook(skip, with_kwargs=True)
    assert len(result.model.get_submodule(result.stack)) == 1
    for raw in held:
        torch.testing.assert_close(outputs(result.model, raw), outputs(reference, raw), atol=1e-5, rtol=1e-5)


@hf_only
def test_block_removal_keeps_the_config_consistent_runs_with_a_cache_and_saves(tmp_path):
    import transformers

    model, data, held = built("hf-llama")
    small = units.prune_transformer(model, data, blocks=[0], refit=False).model
    assert small.config.num_hidden_layers == 1
    assert small.model.layers[0].self_attn.layer_idx == 0
    assert model.config.num_hidden_layers == 2  # the dense model is untouched
    ids = held[0]["input_ids"][:1]
    with torch.no_grad():
        cached = small.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
        plain = small.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    small.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(outputs(loaded, held[0]), outputs(small, held[0]))


def test_remove_blocks_renumbers_layer_counts_types_and_cache_slots():
    from types import SimpleNamespace

    class Attention(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.layer_idx = i

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=4, layer_types=["full", "sliding", "full", "sliding"])
            self.inner = nn.Module()
            self.inner.layers = nn.ModuleList(Attention(i) for i in range(4))
            self.inner.num_layers = 4

    model = Stack()
    kept = [model.inner.layers[i] for i in (0, 3)]
    units.remove_blocks(model, "inner.layers", [1, 2])
    assert list(model.inner.layers) == kept and [a.layer_idx for a in kept] == [0, 1]
    assert model.config.num_hidden_layers == model.inner.num_layers == 2
    assert model.config.layer_types == ["full", "sliding"]


# ------------------------------------------------------------------ rounding
def test_kept_count_rounds_to_the_chosen_multiple():
    assert kept_count(32, 1, 1, 0.3, 8, "nearest") == (24, True)  # target 22 → 24
    assert kept_count(32, 1, 1, 0.3, 8, "down") == (16, True)
    assert kept_count(32, 1, 1, 0.3, 8, "up") == (24, True)
    assert kept_count(32, 1, 1, 0.5, 64, "nearest") == (16, False)  # no multiple of 64 within 32
    assert kept_count(12, 1, 64, 0.25, 128, "nearest") == (10, True)  # heads of 64: an even count
    assert kept_count(2, 2, 4, 0.5, 8, "nearest") == (1, True)  # 1 query head per kv group, 8 features
    assert kept_count(4, 1, 1, 0.9, 4, "down") == (4, True)  # never below one multiple


@hf_only
def test_round_to_sets_the_thinned_widths():
    model, data, _ = built("hf-llama")
    result = units.prune_transformer(model, data, mlp=0.3, heads=0.25, round_to=8)
    mlp = result.model.model.layers[0].mlp
    assert mlp.down_proj.in_features == mlp.gate_proj.out_features == 24
    assert result.model.model.layers[0].self_attn.q_proj.out_features % 8 == 0
    loose = units.prune_transformer(model, data, mlp=0.3, round_to=64)
    assert loose.model.model.layers[0].mlp.down_proj.in_features == 22
    assert "round_to=64" in loose.notes["model.layers.0.mlp"]


# ------------------------------------------------------------------ report and refusals
@hf_only
def test_speed_report_counts_parameters_and_flops():
    model, data, held = built("hf-llama")
    result = units.prune_transformer(model, data, heads=0.5, mlp=0.5, blocks=1)
    report = result.report(model, held[0], batch_sizes=(1, 2), repeats=2, warmup=1, rounds=2)
    dense, pruned = report.rows
    assert dense.params == sum(p.numel() for p in model.parameters())
    assert pruned.params == sum(p.numel() for p in result.model.parameters()) < dense.params
    assert pruned.flops < dense.flops and set(pruned.latency_ms) == {1, 2}
    assert report.ratio("pruned", "params") == pytest.approx(pruned.params / dense.params)
    assert "ms @1" in str(report) and "| pruned |" in str(report)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"heads": 1.0}, "'heads' parameter of prune_transformer must be"),
        ({"mlp": -0.1}, "'mlp' parameter"),
        ({"blocks": 2}, "removes every block"),
        ({"blocks": [5]}, "names block 5"),
        ({"blocks": [-1]}, "'blocks' parameter"),
        ({"gqa": "groups"}, "'gqa' parameter"),
        ({"rounding": "ceil"}, "'rounding' parameter"),
        ({"round_to": 0}, "'round_to' parameter"),
        ({"refit": "exact"}, "'refit' parameter"),
        ({"refit": 1}, "'refit' parameter"),
        ({"scorer": "magnitude"}, "'scorer' parameter"),
        ({"stack": "embed"}, "not an nn.ModuleList"),
    ],
)
def test_bad_arguments_raise_before_any_work(kwargs, match):
    model, data, _ = built("transformer")
    with pytest.raises((ValueError, TypeError), match=match):
        units.prune_transformer(model, data, **{"mlp": 0.5, **kwargs})


def test_no_data_is_refused_where_data_is_needed():
    model, data, _ = built("transformer")
    with pytest.raises(ValueError, match="needs calibration data"):
        units.prune_transformer(model, mlp=0.5)
    small = units.prune_transformer(
        model, mlp=0.5, refit=False, scorer="norm", example_inputs=BY_NAME["transformer"].example
    ).model
    assert small.encoder.layers[1].linear2.in_features == 16
