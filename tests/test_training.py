"""fit/evaluate: determinism, pruning through fit, divergence, data forms."""

import pytest
import torch
from torch import nn

from prunelab.pruning import Pruner
from prunelab.training import TrainingDiverged, evaluate, fit


def data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :3].sum(1) > 0).long()
    return x, y


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))


def test_same_seed_gives_identical_weights():
    runs = []
    for _ in range(2):
        model = net()
        fit(model, data(), epochs=3, batch_size=16, seed=7, progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = net()
    fit(other, data(), epochs=3, batch_size=16, seed=8, progress=False)
    assert not torch.equal(other.state_dict()["1.weight"], runs[0]["1.weight"])


def test_fit_leaves_global_rng_untouched():
    model = net()
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    fit(model, data(), epochs=1, seed=1, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_fit_learns_and_history_records_epochs():
    model = net()
    x, y = data(400)
    history = fit(model, (x[:300], y[:300]), val=(x[300:], y[300:]), epochs=15, batch_size=16,
                  lr=0.05, progress=False)
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert history[-1]["loss"] < history[0]["loss"]
    assert evaluate(model, (x[300:], y[300:]))["accuracy"] > 0.85
    assert history[-1]["val_accuracy"] == pytest.approx(evaluate(model, (x[300:], y[300:]))["accuracy"])


def test_fit_with_pruner_reaches_target_and_keeps_zeros():
    model = net()
    pruner = Pruner(model, 0.8, schedule="iterative",
                    schedule_args={"n_prunes": 4, "exponent": 3, "start": 10, "every": 10})
    history = fit(model, data(), epochs=5, batch_size=16, optimizer="adam", lr=1e-2, pruner=pruner,
                  progress=False)
    assert pruner.done and len(pruner.history) == 4
    assert history[-1]["sparsity"] == pytest.approx(0.8, abs=2e-3)
    assert pruner.sparsity() == pytest.approx(0.8, abs=2e-3)


def test_nan_loss_raises_training_diverged():
    model = net()
    with pytest.raises(TrainingDiverged, match="loss became (nan|inf)"):
        fit(model, data(), epochs=5, batch_size=16, lr=1e12, progress=False)


def test_nan_inputs_are_refused_before_training_with_their_count():
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data()
    x = x.clone()
    x[5] = float("nan")
    x[7, 0, 0, 0] = float("inf")
    n_bad = x[5].numel() + 1
    with pytest.raises(ValueError, match=rf"inputs of the 'data' parameter of fit has {n_bad} non-finite "
                                         rf"entries \({n_bad - 1} NaN, 1 inf\).*index \(5,"):
        fit(model, (x, y), epochs=1, progress=False)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="'data' parameter of evaluate has"):
        evaluate(model, (x, y))


def test_a_model_with_nan_parameters_is_refused_by_fit_naming_the_parameter():
    model = net()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    name = next(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match=rf"parameter '{name}' of the model given to fit has 1 non-finite entry"):
        fit(model, data(), epochs=1, progress=False)


def test_fit_accepts_dataset_like_objects():
    class DS:
        x_train, y_train = data(64)
        x_val, y_val = data(32, seed=1)
        x_test, y_test = data(32, seed=2)
    history = fit(net(), DS(), epochs=1, progress=False)
    assert "val_accuracy" in history[0]
    assert evaluate(net(), DS())["n"] == 32


def test_fit_warns_when_training_ends_before_the_schedule():
    model = net()
    pruner = Pruner(model, 0.8, schedule="agp", schedule_args={"n_prunes": 4, "every": 100})
    with pytest.warns(UserWarning, match=r"before the schedule's last event \(step 400\)"):
        fit(model, data(), epochs=1, batch_size=16, pruner=pruner, progress=False)


def test_evaluate_builds_no_graph_and_conv_batches_match_channels_first():
    grad_modes = []

    class Probe(nn.Module):
        def forward(self, x):
            grad_modes.append(torch.is_grad_enabled())
            return x

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), Probe(), nn.Flatten(), nn.Linear(4 * 7 * 7, 2))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, 16, 16, generator=g), torch.randint(0, 2, (50,), generator=g)
    result = evaluate(conv, (x, y), batch_size=20)
    assert len(grad_modes) >= 3 and not any(grad_modes)        # 3 batches (and a shape check)
    with torch.no_grad():                     # the plain channels-first forward pass
        out = conv(x)
    assert result["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert result["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)
