"""Knowledge distillation in fit: the loss against a hand computation (classes and tokens), weight 0
is plain fit, recovery towards the teacher, the teacher left alone, parameter errors, study specs."""

import copy
import math

import pytest
import torch
from torch import nn

from prunelab.distillation import kl_term
from prunelab.experiments import SpecError, build_study
from prunelab.pruning import Pruner
from prunelab.training import fit

T_SOFT = 2.0


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    return x, y


def net(seed=0, n_classes=3, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Dropout(dropout), nn.Linear(24, n_classes))


class TokenModel(nn.Module):
    def __init__(self, vocab=11, d=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, input_ids):
        return self.out(torch.tanh(self.embed(input_ids)))


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, T: float) -> float:
    """KL(softmax(t/T) ‖ softmax(s/T)) of one row, term by term in float64."""
    s = [float(v) / T for v in student]
    t = [float(v) / T for v in teacher]
    zs, zt = math.log(sum(math.exp(v) for v in s)), math.log(sum(math.exp(v) for v in t))
    return sum(math.exp(b - zt) * ((b - zt) - (a - zs)) for a, b in zip(s, t))


def test_kl_term_of_class_logits_is_the_hand_computed_mean():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    expected = T_SOFT**2 * sum(hand_kl(s[i], t[i], T_SOFT) for i in range(5)) / 5
    assert float(kl_term(s, t, T_SOFT)) == pytest.approx(expected, rel=1e-12)
    keep = torch.tensor([True, False, True, True, False])
    expected = T_SOFT**2 * sum(hand_kl(s[i], t[i], T_SOFT) for i in (0, 2, 3)) / 3
    assert float(kl_term(s, t, T_SOFT, keep)) == pytest.approx(expected, rel=1e-12)
    assert float(kl_term(t, t, T_SOFT)) == pytest.approx(0.0, abs=1e-15)


def test_fit_records_the_hand_computed_loss_on_classes_with_ignored_labels():
    x, y = data(12)
    y[[2, 7]] = -100  # ignored: counted by neither term
    student, teacher = net(0).double(), net(1).double()
    with torch.no_grad():
        s, t = student(x.double()), teacher(x.double())
    kept = [i for i in range(12) if y[i] != -100]
    soft = T_SOFT**2 * sum(hand_kl(s[i], t[i], T_SOFT) for i in kept) / len(kept)
    task = sum(-float(torch.log_softmax(s[i], 0)[y[i]]) for i in kept) / len(kept)
    history = fit(
        student,
        [(x.double(), y)],
        distill_from=teacher,
        distill_weight=0.3,
        temperature=T_SOFT,
        lr=1e-3,
        progress=False,
    )
    assert history[0]["distill_loss"] == pytest.approx(soft, rel=1e-10)
    assert history[0]["task_loss"] == pytest.approx(task, rel=1e-10)
    assert history[0]["loss"] == pytest.approx(0.7 * task + 0.3 * soft, rel=1e-10)


def test_fit_on_tokens_averages_over_the_positions_the_next_token_loss_counts():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    labels = ids.clone()
    labels[0, 3] = -100  # HF labels: position 2 predicts token 3 → left out
    labels[2, 4] = -100
    student, teacher = TokenModel(seed=0).double(), TokenModel(seed=1).double()
    with torch.no_grad():
        s, t = student(ids), teacher(ids)
    rows = [(n, p) for n in range(3) for p in range(4) if labels[n, p + 1] != -100]
    assert len(rows) == 10
    soft = T_SOFT**2 * sum(hand_kl(s[n, p], t[n, p], T_SOFT) for n, p in rows) / len(rows)
    history = fit(
        student,
        [{"input_ids": ids, "labels": labels}],
        distill_from=teacher,
        distill_weight=0.5,
        temperature=T_SOFT,
        lr=1e-3,
        progress=False,
    )
    assert history[0]["distill_loss"] == pytest.approx(soft, rel=1e-10)
    # without targets, next-token targets from the inputs: every position but the last counts
    student = TokenModel(seed=0).double()
    every = T_SOFT**2 * sum(hand_kl(s[n, p], t[n, p], T_SOFT) for n in range(3) for p in range(4)) / 12
    history = fit(student, [ids], distill_from=teacher, distill_weight=0.5, temperature=T_SOFT, lr=1e-3, progress=False)
    assert history[0]["distill_loss"] == pytest.approx(every, rel=1e-10)


def test_weight_zero_is_plain_fit_bit_for_bit_with_a_pruning_schedule():
    x, y = data()
    runs = []
    for teacher in (None, net(5, dropout=0.3)):
        model = net(0, dropout=0.3)
        pruner = Pruner(model, 0.8, schedule="agp", schedule_args={"n_prunes": 3, "every": 4})
        kwargs = {} if teacher is None else {"distill_from": teacher, "distill_weight": 0.0}
        history = fit(model, (x, y), epochs=3, batch_size=32, pruner=pruner, seed=3, progress=False, **kwargs)
        runs.append((model.state_dict(), history))
    (a, ha), (b, hb) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert "distill_loss" not in hb[0]


def test_distillation_brings_a_pruned_model_closer_to_its_teacher():
    x, y = data(512)
    x_test, _ = data(512, seed=9)
    dense = net(0)
    fit(dense, (x, y), epochs=20, batch_size=32, lr=0.05, progress=False)
    distances = {}
    for weight in (0.0, 0.9):
        student = copy.deepcopy(dense)
        pruner = Pruner(student, 0.8, criterion="magnitude")
        pruner.update()
        fit(
            student,
            (x[:64], y[:64]),
            epochs=20,
            batch_size=16,
            lr=0.05,
            pruner=pruner,
            progress=False,
            distill_from=dense,
            distill_weight=weight,
            temperature=T_SOFT,
        )
        assert pruner.sparsity() == pytest.approx(0.8, abs=0.01)
        with torch.no_grad():
            distances[weight] = float(kl_term(student(x_test), dense(x_test), 1.0))
    assert distances[0.9] < 0.7 * distances[0.0]


def test_the_teacher_runs_in_eval_mode_and_is_left_as_it_was():
    x, y = data(64)
    teacher = net(1, dropout=0.5).train()
    before = copy.deepcopy(teacher.state_dict())
    modes = []
    teacher[2].register_forward_hook(lambda m, i, o: modes.append(m.training))
    model = net(0)
    fit(model, (x, y), epochs=2, batch_size=16, distill_from=teacher, progress=False)
    assert modes and not any(modes)
    assert teacher.training and teacher[2].training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (
            {"distill_weight": 1.5},
            ValueError,
            r"'distill_weight' parameter of fit must be a float in \[0, 1\]\. Got 1.5",
        ),
        ({"distill_weight": -0.1}, ValueError, r"'distill_weight' parameter of fit must be a float in \[0, 1\]"),
        ({"distill_weight": "half"}, TypeError, r"'distill_weight' parameter of fit must be a float"),
        ({"temperature": 0}, ValueError, r"'temperature' parameter of fit must be a float in \(0, inf\)\. Got 0"),
        ({"temperature": -2.0}, ValueError, r"'temperature' parameter of fit must be a float in \(0, inf\)"),
        ({"temperature": math.inf}, ValueError, r"'temperature' parameter of fit"),
        ({"distill_from": "teacher.pt"}, TypeError, r"'distill_from' parameter of fit must be an nn.Module"),
        ({"distill_from": net(1, n_classes=4)}, ValueError, r"gives logits of shape \(1, 4\).*model gives \(1, 3\)"),
        ({"distill_from": nn.Linear(5, 3)}, ValueError, r"teacher .* fails on the first batch of 'data'"),
    ],
)
def test_bad_distillation_parameters_are_refused_before_any_work(kwargs, error, pattern):
    x, y = data(64)
    model = net(0)
    before = copy.deepcopy(model.state_dict())
    kwargs = {"distill_from": net(1), **kwargs}
    with pytest.raises(error, match=pattern):
        fit(model, (x, y), progress=False, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_teacher_that_is_the_model_or_shares_its_weights_is_refused():
    x, y = data(64)
    model = net(0)
    with pytest.raises(ValueError, match="is the model being trained"):
        fit(model, (x, y), distill_from=model, progress=False)
    shared = nn.Sequential(model[0], nn.ReLU(), nn.Linear(24, 3))
    with pytest.raises(ValueError, match="shares 2 parameter tensor"):
        fit(model, (x, y), distill_from=shared, progress=False)
    with pytest.raises(ValueError, match="'temperature' parameter of fit applies only with distill_from="):
        fit(model, (x, y), temperature=2.0, progress=False)


# ------------------------------------------------------------------ study specs
SPEC = {
    "name": "kd",
    "datasets": ["digits"],
    "models": [{"name": "mlp", "hidden": [16]}],
    "methods": [{"label": "mag"}],
    "sparsities": [0.9],
    "seeds": 1,
    "training": {"epochs": 1, "finetune_epochs": 1},
}


def _spec(**method):
    return {**SPEC, "methods": [{"label": "mag", **method}]}


def test_a_spec_distill_entry_is_resolved_with_its_defaults_and_keeps_other_ids():
    plain = build_study(_spec()).runs[0]
    assert "distill" not in plain.config["method"]
    assert build_study(_spec(distill=False)).runs[0].id == plain.id
    run = build_study(_spec(distill={"weight": 0.8})).runs[0]
    assert run.config["method"]["distill"] == {"weight": 0.8, "temperature": 2.0}
    assert build_study(_spec(distill=True)).runs[0].config["method"]["distill"] == {"weight": 0.5, "temperature": 2.0}
    from prunelab.engine.harness import why_not_batched

    assert "distillation" in why_not_batched(run.config) and why_not_batched(plain.config) is None


def test_spec_distill_errors_are_listed_with_their_paths():
    spec = {
        **SPEC,
        "methods": [
            {"label": "a", "distill": {"weight": 1.5, "temperature": 0, "alpha": 1}},
            {"label": "b", "distill": "yes"},
        ],
    }
    with pytest.raises(SpecError) as info:
        build_study(spec)
    text = str(info.value)
    assert "methods[0].distill.alpha: unknown key; valid keys: weight, temperature" in text
    assert "methods[0].distill.weight: the 'distill_weight' parameter must be a float in [0, 1]. Got 1.5" in text
    assert "methods[0].distill.temperature: the 'temperature' parameter must be a float in (0, inf). Got 0" in text
    assert "methods[1].distill: must be true or a mapping" in text
    no_finetune = {**_spec(distill=True), "training": {"epochs": 1, "finetune_epochs": 0}}
    with pytest.raises(SpecError, match="finetune_epochs is 0"):
        build_study(no_finetune)


def test_a_prune_run_with_distill_records_both_losses(monkeypatch):
    from prunelab.experiments.prune_task import execute_prune

    config = build_study(_spec(distill={"weight": 0.5, "temperature": 3.0})).runs[0].config
    calls = []
    import prunelab.experiments.prune_task as task

    real_fit = task.fit

    def spy(model, data, **kwargs):
        calls.append(kwargs)
        return real_fit(model, data, **kwargs)

    monkeypatch.setattr(task, "fit", spy)
    result = execute_prune(config)
    finetune = calls[-1]
    assert finetune["distill_weight"] == 0.5 and finetune["temperature"] == 3.0
    teacher = finetune["distill_from"]
    assert all(bool((p != 0).all()) for n, p in teacher.named_parameters() if n.endswith("weight"))  # dense
    prune_phase = [c for c in result["curve"] if c["phase"] == "prune"]
    assert prune_phase and all("distill_loss" in c and "task_loss" in c for c in prune_phase)
    assert result["metrics"]["sparsity"] > 0.5
