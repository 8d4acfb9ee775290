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
    x, y = data()
    x = x.clone()
    x[5] = float("nan")
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        fit(model, (x, y), epochs=1, batch_size=400, progress=False)


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
