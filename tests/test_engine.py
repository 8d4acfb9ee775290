"""The batched engine: R members trained as one computation follow the same trajectories as
the same models trained alone, and never influence each other."""

import copy

import pytest
import torch

import prunelab
from prunelab.engine import BatchedModels, fit_batched
from prunelab.training import TrainingDiverged

SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def ds():
    return prunelab.load_dataset("digits")


def members(ds, name="mlp", **options):
    return [prunelab.build_model(name, dataset=ds, seed=s, **options) for s in SEEDS]


def max_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("optimizer,lrs", [("sgd", [0.05, 0.1, 0.02, 0.05]), ("adam", [1e-3, 2e-3, 1e-3, 5e-4])])
def test_batched_members_match_single_runs_with_their_masks(ds, optimizer, lrs):
    models = members(ds, hidden=[32, 16])
    pruners = [prunelab.prune(m, 0.5 + 0.1 * r, criterion="random", seed=r) for r, m in enumerate(models)]
    singles = [copy.deepcopy(m) for m in models]
    batch = BatchedModels(models)
    batch.set_masks(
        {name: torch.stack([p.mask(name) for p in pruners]) for name in ("fc1.weight", "fc2.weight", "fc3.weight")}
    )
    fit_batched(batch, ds, seeds=SEEDS, epochs=2, lr=lrs, optimizer=optimizer, max_steps=30)
    for r, (single, lr) in enumerate(zip(singles, lrs)):
        pruner = prunelab.Pruner(single, 0.5 + 0.1 * r, criterion="random", seed=r)  # same masks, re-derived
        pruner.update()
        prunelab.fit(
            single, ds, epochs=2, lr=lr, optimizer=optimizer, seed=SEEDS[r], max_steps=30, pruner=pruner, progress=False
        )
        member = batch.member(r)
        assert max_gap(member, single) < 1e-5
        # each member keeps its own target sparsity
        pruned = sum(int((member.get_parameter(n) == 0).sum()) for n in ("fc1.weight", "fc2.weight", "fc3.weight"))
        total = sum(member.get_parameter(n).numel() for n in ("fc1.weight", "fc2.weight", "fc3.weight"))
        assert pruned / total == pytest.approx(0.5 + 0.1 * r, abs=2e-3)


def test_validation_is_each_members_own_accuracy_after_every_epoch(ds):
    split = ds.with_validation(300, seed=0)
    batch = BatchedModels(members(split, hidden=[16]))
    histories = fit_batched(batch, split, seeds=SEEDS, epochs=2, lr=[0.05, 0.1, 0.02, 0.05], validation=split)
    for r, history in enumerate(histories):
        assert [sorted(h) for h in history] == [sorted(history[0])] * 2 and "val_accuracy" in history[0]
        alone = prunelab.evaluate(batch.member(r), (split.x_val, split.y_val))
        assert history[-1]["val_accuracy"] == pytest.approx(alone["accuracy"], abs=1e-12)
        assert history[-1]["val_loss"] == pytest.approx(alone["loss"], rel=1e-5)
    accuracies = {h[-1]["val_accuracy"] for h in histories}
    assert len(accuracies) > 1  # four models, four evaluations (not one member's copied)
    no_val = fit_batched(BatchedModels(members(ds, hidden=[16])), ds, seeds=SEEDS, epochs=1, max_steps=3)
    assert all("val_accuracy" not in h[0] for h in no_val)


def test_a_dataset_without_a_validation_split_is_refused_as_validation(ds):
    with pytest.raises(ValueError, match="'validation' parameter of fit_batched is a Dataset without a validation"):
        fit_batched(BatchedModels(members(ds, hidden=[16])), ds, seeds=SEEDS, validation=ds)


def test_changing_one_members_data_leaves_the_others_bit_identical(ds):
    # member 2 gets another data order (its seed) and another learning rate; the others must not notice
    base = BatchedModels(members(ds, hidden=[16]))
    other = BatchedModels(members(ds, hidden=[16]))
    fit_batched(base, ds, seeds=[0, 1, 2, 3], epochs=1, lr=0.05, max_steps=10)
    fit_batched(other, ds, seeds=[0, 1, 99, 3], epochs=1, lr=[0.05, 0.05, 0.2, 0.05], max_steps=10)
    for r in (0, 1, 3):
        for name in base.params:
            assert torch.equal(base.params[name][r], other.params[name][r])
    assert not torch.equal(base.params["fc1.weight"][2], other.params["fc1.weight"][2])


def test_lenet5_members_match_single_runs():
    # in float64: in float32 a max-pool whose two inputs differ by a rounding error can route a
    # gradient differently after a few steps, and the trajectories part (seen: 1e-3 after 4 steps)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(160, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 10, (160,), generator=g))
    models = [prunelab.build_model("lenet5", input_shape=(1, 28, 28), n_classes=10, seed=s).double() for s in SEEDS]
    singles = [copy.deepcopy(m) for m in models]
    batch = BatchedModels(models)
    fit_batched(batch, data, seeds=SEEDS, epochs=2, lr=0.05, batch_size=32, max_steps=8)
    for r, single in enumerate(singles):
        prunelab.fit(single, data, epochs=2, lr=0.05, batch_size=32, seed=SEEDS[r], max_steps=8, progress=False)
        assert max_gap(batch.member(r), single) < 1e-12


@pytest.mark.parametrize("wave", [None, 2])
def test_a_diverging_member_is_named(ds, wave):
    batch = BatchedModels(members(ds, hidden=[16]))
    with pytest.raises(TrainingDiverged, match=r"member\(s\) \[3\]"):  # in the second wave of 2
        fit_batched(batch, ds, seeds=SEEDS, epochs=3, lr=[0.05, 0.05, 0.05, 1e12], wave=wave)


def test_bad_input_is_named(ds):
    with pytest.raises(ValueError, match="one architecture"):
        BatchedModels(
            [prunelab.build_model("mlp", dataset=ds, hidden=[16]), prunelab.build_model("mlp", dataset=ds, hidden=[17])]
        )
    batch = BatchedModels(members(ds, hidden=[16]))
    with pytest.raises(ValueError, match="one seed per member"):
        fit_batched(batch, ds, seeds=[0, 1])
    with pytest.raises(ValueError, match="one value per member"):
        fit_batched(batch, ds, seeds=SEEDS, lr=[0.1, 0.1])
    with pytest.raises(ValueError, match="must be one of: adam, sgd. Got .lbfgs."):
        fit_batched(batch, ds, seeds=SEEDS, optimizer="lbfgs")
    with pytest.raises(ValueError, match="mask of 'fc1.weight' has shape"):
        batch.set_masks({"fc1.weight": torch.ones(16, 64)})


@pytest.mark.parametrize(
    "criterion,scope,granularity,regularizer,wave",
    [
        ("magnitude", "local", "weight", "l1", None),
        ("magnitude", "global", "unit", "l2", 3),  # at most 3 a wave: two even waves of 2
        ("random", "layerwise-constant", "weight", None, 1),
    ],
)
def test_each_member_follows_its_own_schedule_to_its_own_target(ds, criterion, scope, granularity, regularizer, wave):
    targets = [0.5, 0.7, 0.8, 0.9]
    strengths = [1e-4, 2e-4, 0.0, 1e-4]

    def pruner_for(model, r):
        return prunelab.Pruner(
            model,
            targets[r],
            criterion=criterion,
            scope=scope,
            granularity=granularity,
            schedule="agp",
            schedule_args={"n_prunes": 3, "every": 5, "start": 2},
            seed=r,
        )

    models = members(ds, hidden=[32, 16])
    singles = [copy.deepcopy(m) for m in models]
    batch = BatchedModels(models)
    pruners = [pruner_for(m, r) for r, m in enumerate(batch.members)]
    reg = {"regularizer": regularizer, "reg_strength": strengths} if regularizer else {}
    histories = fit_batched(batch, ds, seeds=SEEDS, epochs=2, lr=0.05, pruners=pruners, max_steps=25, wave=wave, **reg)
    for r, single in enumerate(singles):
        pruner = pruner_for(single, r)
        reg_single = {"regularizer": regularizer, "reg_strength": strengths[r]} if regularizer else {}
        prunelab.fit(
            single, ds, epochs=2, lr=0.05, seed=SEEDS[r], pruner=pruner, max_steps=25, progress=False, **reg_single
        )
        assert max_gap(batch.member(r), single) < 1e-4
        assert histories[r][-1]["sparsity"] == pytest.approx(pruner.sparsity(), abs=1e-9)
        assert pruners[r].sparsity() == pytest.approx(targets[r], abs=0.02)
        assert [h.step for h in pruners[r].history] == [h.step for h in pruner.history] == [2, 7, 12, 17]
        # the batch's own masks (made inside a wave too) are the member's
        for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
            assert torch.equal(batch.masks[name][r].bool(), pruners[r].mask(name).bool())


def test_hand_written_mlp_path_equals_vmap_and_autograd(ds):
    from prunelab.engine.batched import mlp_plan

    assert mlp_plan(members(ds, hidden=[32, 16])[0]) == [
        ("fc1.weight", "fc1.bias"),
        ("fc2.weight", "fc2.bias"),
        ("fc3.weight", "fc3.bias"),
    ]
    assert mlp_plan(prunelab.build_model("small_conv", dataset=ds)) is None
    assert mlp_plan(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))) is None
    runs = []
    for path in ("auto", "vmap"):
        batch = BatchedModels(members(ds, hidden=[32, 16]))
        fit_batched(
            batch,
            ds,
            seeds=SEEDS,
            epochs=1,
            lr=[0.05, 0.1, 0.02, 0.05],
            regularizer="l1",
            reg_strength=1e-4,
            max_steps=20,
            engine_path=path,
        )
        runs.append(batch)
    for name in runs[0].params:
        assert torch.allclose(runs[0].params[name], runs[1].params[name], atol=1e-5)


def test_member_bytes_by_hand_and_choose_members_within_the_budget():
    from prunelab.engine import choose_members, member_bytes

    model = prunelab.build_model("mlp", input_shape=(1, 28, 28), n_classes=10, hidden=[100])
    params = 784 * 100 + 100 + 100 * 10 + 10
    outputs = 784 + 100 + 100 + 10  # flatten, fc1, its ReLU, fc2, per image
    expected = 5 * 4 * params + 2 * 16 * 4 * outputs
    assert member_bytes(model, (1, 28, 28), 16) == expected
    assert choose_members(model, (1, 28, 28), 16, wanted=32, budget_bytes=10 * expected + 5) == 10
    assert choose_members(model, (1, 28, 28), 16, wanted=8, budget_bytes=10 * expected) == 8
    assert choose_members(model, (1, 28, 28), 16, wanted=4) >= 1  # this machine's free memory
    with pytest.raises(ValueError, match=r"needs about 1\.6 MiB .* only 0\.0 MiB"):
        choose_members(model, (1, 28, 28), 16, wanted=4, budget_bytes=1000)
    with pytest.raises(ValueError, match="'share' parameter of choose_members"):
        choose_members(model, (1, 28, 28), 16, wanted=4, share=0.0)


def test_cache_members_divides_the_last_level_cache(monkeypatch):
    from prunelab.engine import cache_members, member_bytes, memory

    assert memory.cache_bytes() >= 2**10  # this machine's, or the 32 MiB default
    model = prunelab.build_model("mlp", input_shape=(1, 28, 28), n_classes=10, hidden=[100])
    per_member = member_bytes(model, (1, 28, 28), 64)
    monkeypatch.setattr(memory, "cache_bytes", lambda: 10 * per_member + 1)
    assert cache_members(model, (1, 28, 28), 64) == 10
    assert cache_members(model, (1, 28, 28), 64, share=0.5) == 5
    monkeypatch.setattr(memory, "cache_bytes", lambda: 100)
    assert cache_members(model, (1, 28, 28), 64) == 1  # never fewer than one


def test_a_group_of_study_runs_gives_the_records_of_single_runs(tmp_path):
    from prunelab.runs.batched import execute_prune_group, group_key, why_not_batched
    from prunelab.runs.prune import execute_prune
    from prunelab.study import build_study

    study = build_study(
        {
            "name": "g",
            "datasets": ["digits"],
            "models": [{"name": "mlp", "hidden": [32]}],
            "methods": [
                {"label": "mag", "schedule": {"name": "agp", "n_prunes": 3}},
                {"label": "rand", "criterion": "random", "regularizer": {"name": "l1", "strength": 1e-4}},
            ],
            "sparsities": [0.8, 0.9],
            "seeds": 2,
            "training": {"epochs": 2, "finetune_epochs": 2, "batch_size": 64, "lr": 0.05},
        }
    )
    configs = [run.config for run in study.runs]
    assert all(why_not_batched(c) is None for c in configs)
    groups = {}
    for c in configs:
        groups.setdefault(group_key(c), []).append(c)
    assert sorted(len(g) for g in groups.values()) == [4, 4]  # with and without the L1 regulariser
    for group in groups.values():
        batched = execute_prune_group(group, str(tmp_path / "cache-b"))
        for config, result in zip(group, batched):
            single = execute_prune(config, str(tmp_path / "cache-s"))["metrics"]
            got = result["metrics"]
            assert got["sparsity"] == pytest.approx(single["sparsity"], abs=1e-9)
            assert got["layer_sparsity"] == pytest.approx(single["layer_sparsity"], abs=1e-9)
            assert got["accuracy_dense"] == pytest.approx(single["accuracy_dense"], abs=1 / 360 + 1e-9)
            assert got["accuracy"] == pytest.approx(single["accuracy"], abs=2 / 360 + 1e-9)
            assert got["nonzero_params"] == single["nonzero_params"] and got["engine"] == "batched"
            assert [h["phase"] for h in result["curve"]] == ["dense"] * 2 + ["prune"] * 2
    retrain = copy.deepcopy(configs[0])
    retrain["training"]["retrain_tolerance"] = 0.01
    assert "retrain_tolerance" in why_not_batched(retrain)


def test_study_runs_with_a_validation_split_batch_and_report_the_single_runs_val_accuracy(tmp_path):
    from prunelab.runs.batched import execute_prune_group, group_key, why_not_batched
    from prunelab.runs.prune import execute_prune
    from prunelab.study import build_study

    study = build_study(
        {
            "name": "v",
            "datasets": [{"name": "digits", "validation": 300}],
            "models": [{"name": "mlp", "hidden": [32]}],
            "methods": [{"label": "l1", "regularizer": {"name": "l1", "strength": {"grid": [1e-5, 1e-3]}}}],
            "sparsities": [0.9],
            "seeds": 2,
            "training": {"epochs": 2, "finetune_epochs": 2, "batch_size": 64, "lr": 0.05},
            "outputs": {"metric": "val_accuracy"},
        }
    )
    configs = [run.config for run in study.runs]
    assert len(configs) == 4 and all(why_not_batched(c) is None for c in configs)
    assert len({group_key(c) for c in configs}) == 1
    batched = execute_prune_group(configs, str(tmp_path / "cache-b"))
    for config, result in zip(configs, batched):
        single = execute_prune(config, str(tmp_path / "cache-s"))
        got, want = result["metrics"], single["metrics"]
        # 300 validation images: one or two of them may flip between batched and single rounding
        assert got["val_accuracy"] == pytest.approx(want["val_accuracy"], abs=2 / 300 + 1e-9)
        assert got["val_accuracy_dense"] == pytest.approx(want["val_accuracy_dense"], abs=2 / 300 + 1e-9)
        assert [sorted(h) for h in result["curve"]] == [sorted(h) for h in single["curve"]]
        assert result["curve"][-1]["val_accuracy"] == pytest.approx(got["val_accuracy"], abs=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_engine_runs_on_cuda_unchanged(ds):
    cpu = BatchedModels(members(ds, hidden=[32]))
    gpu = BatchedModels([m.cuda() for m in members(ds, hidden=[32])])
    for batch in (cpu, gpu):
        pruners = [
            prunelab.Pruner(m, 0.8, schedule="agp", schedule_args={"n_prunes": 2, "every": 5}) for m in batch.members
        ]
        fit_batched(batch, ds, seeds=SEEDS, epochs=1, lr=0.05, pruners=pruners, max_steps=15)
    for r in range(len(SEEDS)):
        assert max_gap(cpu.member(r), gpu.member(r).cpu()) < 1e-4
