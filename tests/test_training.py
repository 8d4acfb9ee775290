"""fit/evaluate: determinism, pruning through fit, divergence, data forms."""

import math

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
    history = fit(model, (x[:300], y[:300]), val=(x[300:], y[300:]), epochs=15, batch_size=16, lr=0.05, progress=False)
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert history[-1]["loss"] < history[0]["loss"]
    assert evaluate(model, (x[300:], y[300:]))["accuracy"] > 0.85
    assert history[-1]["val_accuracy"] == pytest.approx(evaluate(model, (x[300:], y[300:]))["accuracy"])


def test_fit_with_pruner_reaches_target_and_keeps_zeros():
    model = net()
    pruner = Pruner(
        model, 0.8, schedule="iterative", schedule_args={"n_prunes": 4, "exponent": 3, "start": 10, "every": 10}
    )
    history = fit(model, data(), epochs=5, batch_size=16, optimizer="adam", lr=1e-2, pruner=pruner, progress=False)
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
    with pytest.raises(
        ValueError,
        match=rf"inputs of the 'data' parameter of fit has {n_bad} non-finite "
        rf"entries \({n_bad - 1} NaN, 1 inf\).*index \(5,",
    ):
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
    assert len(grad_modes) >= 3 and not any(grad_modes)  # 3 batches (and a shape check)
    with torch.no_grad():  # the plain channels-first forward pass
        out = conv(x)
    assert result["accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
    assert result["loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-5)


# ----------------------------------------------------------------------------- any batches
class TinyLM(nn.Module):
    """Embedding + linear decoder: token logits (N, T, V)."""

    def __init__(self, vocab=11, d=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.decoder = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.decoder(self.embed(input_ids))


class DictOut(nn.Module):
    """A classifier returning a dict, as many libraries do."""

    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x):
        return {"scores": self.body(x), "aux": torch.zeros(())}


def token_batches(sizes=(3, 5), vocab=11, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n, seq), generator=g) for n in sizes]


def test_evaluate_on_token_logits_matches_a_hand_computed_next_token_loss():
    model = TinyLM()
    batches = token_batches()
    losses, hits, count = [], 0, 0
    with torch.no_grad():
        for t in batches:
            logits = model(t)[:, :-1].reshape(-1, 11)
            target = t[:, 1:].reshape(-1)
            losses.append(nn.functional.cross_entropy(logits, target, reduction="none"))
            hits += int((logits.argmax(1) == target).sum())
            count += target.numel()
    mean = float(torch.cat(losses).mean())
    result = evaluate(model, batches)
    assert result["loss"] == pytest.approx(mean, rel=1e-6)
    assert result["accuracy"] == hits / count and result["tokens"] == count == (3 + 5) * 5
    assert result["perplexity"] == pytest.approx(math.exp(mean), rel=1e-6)
    assert result["n"] == 8


def test_hf_labels_with_ignore_index_count_only_the_labelled_tokens():
    model = TinyLM()
    ids = token_batches((4,))[0]
    labels = ids.clone()
    labels[:, :3] = -100  # positions 0..2 carry no label
    result = evaluate(model, [{"input_ids": ids, "labels": labels}])
    with torch.no_grad():
        logits = model(ids)[:, :-1].reshape(-1, 11)
    target = labels[:, 1:].reshape(-1)  # HF convention: position t predicts label t+1
    keep = target != -100
    assert result["tokens"] == int(keep.sum()) == 4 * 3
    assert result["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits[keep], target[keep])), rel=1e-6)


def test_every_form_of_the_same_batches_gives_the_same_evaluation():
    model = net()
    x, y = data(40)
    pairs = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    reference = evaluate(model, (x, y), batch_size=16)
    for form in (pairs, loader, lambda: iter(pairs), iter(pairs)):
        assert evaluate(model, form) == reference
    dict_model = DictOut()
    dict_model.body.load_state_dict(model.state_dict())
    assert evaluate(dict_model, pairs, output_key="scores") == reference


def test_fit_on_a_list_of_batches_is_a_plain_training_loop_over_them():
    x, y = data(48)
    pairs = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]
    model, reference = net(), net()
    reference.eval()  # no dropout in both: fit seeds the RNG, a hand loop would not
    model[3].p = reference[3].p = 0.0
    fit(model, pairs, epochs=2, lr=0.1, momentum=0.0, progress=False)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference.train()
    for _ in range(2):
        for xb, yb in pairs:
            opt.zero_grad()
            nn.functional.cross_entropy(reference(xb), yb).backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_fit_on_a_shuffling_dataloader_is_deterministic_and_leaves_the_rng_alone():
    x, y = data(64)

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)

    runs = []
    for _ in range(2):
        model = net()
        torch.manual_seed(42)
        history = fit(model, loader(), epochs=2, seed=5, progress=False)
        after = torch.rand(2)
        torch.manual_seed(42)
        assert torch.equal(after, torch.rand(2))
        runs.append([p.detach().clone() for p in model.parameters()])
        assert [h["step"] for h in history] == [4, 8]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fit_trains_a_token_model_from_dicts_in_memory_and_as_batches():
    ids = torch.cat(token_batches((16, 16)))
    history = fit(TinyLM(), {"input_ids": ids, "labels": ids}, epochs=8, batch_size=8, lr=0.5, progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    assert 0.0 <= history[-1]["train_accuracy"] <= 1.0
    model = TinyLM()
    batches = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in token_batches((8, 8, 8))]
    before = evaluate(model, batches)["loss"]
    history = fit(model, lambda: iter(batches), epochs=6, lr=0.5, progress=False, val=batches)
    assert history[-1]["val_loss"] == pytest.approx(evaluate(model, batches)["loss"])
    assert history[-1]["val_loss"] < before


def test_a_user_loss_and_output_key_drive_fit_and_evaluate():
    x, y = data(32)
    model = DictOut()

    def loss_fn(output, targets):
        return nn.functional.cross_entropy(output["scores"], targets) + 0.0 * output["aux"]

    history = fit(model, [(x, y)], epochs=3, loss_fn=loss_fn, progress=False)
    assert len(history) == 3 and math.isfinite(history[-1]["loss"])
    result = evaluate(model, [(x, y)], loss_fn=loss_fn, output_key="scores")
    assert result["loss"] == pytest.approx(evaluate(model, [(x, y)], output_key="scores")["loss"], rel=1e-6)
    regression = evaluate(net(), [(x, torch.zeros(32, 2))], loss_fn=nn.functional.mse_loss)
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(net().eval()(x), torch.zeros(32, 2)))
    assert regression["loss"] == pytest.approx(expected, rel=1e-6) and math.isnan(regression["accuracy"])


def test_a_gradient_pruner_observes_the_batches_of_fit():
    model = TinyLM()
    pruner = Pruner(
        model, 0.5, criterion="gradient", schedule="agp", schedule_args={"n_prunes": 2, "every": 3, "start": 2}
    )
    fit(model, token_batches((4, 4, 4)), epochs=4, lr=0.1, pruner=pruner, progress=False)
    assert pruner.done and pruner.criterion.n_observed > 0
    assert pruner.sparsity() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(model.decoder.weight == 0, pruner.mask("decoder.weight") == 0)


def unchanged(model, before):
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "bad,kwargs,error,pattern",
    [
        ("iterator", {"epochs": 2}, ValueError, r"'data' parameter of fit is an iterator.*epochs=2"),
        ("list", {"batch_size": 8}, ValueError, r"'batch_size' parameter of fit applies to in-memory data"),
        ("empty", {}, ValueError, r"'data' parameter of fit is empty \(no batches\)"),
        ("tensor", {}, TypeError, r"'data' parameter of fit is a single tensor"),
        ("ints", {}, TypeError, r"'data' parameter of fit must be an \(x, y\) pair.*batch 0 is a int"),
        ("no-targets", {}, ValueError, r"'data' parameter of fit does not fit the model's output: .*no targets"),
        ("wrong-shape", {}, ValueError, r"inputs of the 'data' parameter of fit \(\(4, 3\) float32\) do not fit"),
        ("factory", {}, TypeError, r"is a function, which must return an iterable of batches"),
        ("nan", {}, ValueError, r"inputs of batch 0 of the 'data' parameter of fit has 1 non-finite"),
        ("loss", {"loss_fn": lambda out, y: out}, ValueError, r"loss_fn must return a scalar tensor"),
        ("labels", {}, ValueError, r"its labels must be class indices in \[0, 1\].*from 0 to 7"),
    ],
)
def test_fit_refuses_bad_batches_before_training(bad, kwargs, error, pattern):
    x, y = data(8)
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = float("nan")
    bad_y = y.clone()
    bad_y[5] = 7  # not in the first example: the whole in-memory set is checked
    given = {
        "iterator": iter([(x, y)]),
        "list": [(x, y)],
        "empty": [],
        "tensor": x,
        "ints": [1, 2, 3],
        "no-targets": [x],
        "wrong-shape": [(torch.randn(4, 3), y[:4])],
        "factory": lambda: 3,
        "nan": [(nan_x, y)],
        "loss": [(x, y)],
        "labels": (x, bad_y),
    }[bad]
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=pattern):
        fit(model, given, progress=False, **kwargs)
    assert unchanged(model, before)


def test_ignored_class_labels_count_nowhere_in_memory_or_as_batches():
    model = net()
    x, y = data(30)
    y = y.clone()
    y[::3] = -100
    keep = y != -100
    with torch.no_grad():
        out = model.eval()(x)
    expected = float(nn.functional.cross_entropy(out[keep], y[keep]))
    for form in ((x, y), [(x[:10], y[:10]), (x[10:], y[10:])]):
        result = evaluate(model, form)
        assert result["loss"] == pytest.approx(expected, rel=1e-6)
        assert result["accuracy"] == int((out.argmax(1) == y)[keep].sum()) / int(keep.sum())


def test_lr_drop_multiplies_the_learning_rate_after_the_listed_epochs():
    torch.manual_seed(0)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(4, 3))
    history = fit(model, (x, y), epochs=4, batch_size=32, lr=0.1, lr_drop=[1, 3], lr_drop_factor=0.5, progress=False)
    assert [h["lr"] for h in history] == pytest.approx([0.1, 0.05, 0.05, 0.025])
    assert "lr" not in fit(nn.Sequential(nn.Linear(4, 3)), (x, y), epochs=1, progress=False)[0]
    # the drop is the same as training at the lower rate from that epoch on
    a, b = nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3))
    b.load_state_dict(a.state_dict())
    fit(a, (x, y), epochs=2, batch_size=64, lr=0.1, momentum=0.0, lr_drop=[1], progress=False)
    fit(b, (x, y), epochs=1, batch_size=64, lr=0.1, momentum=0.0, progress=False)
    fit(b, (x, y), epochs=1, batch_size=64, lr=0.01, momentum=0.0, seed=0, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):  # one full batch per epoch: the order does not matter
        assert torch.allclose(p, q, atol=1e-6)
    with pytest.raises(ValueError, match="lr_drop"):
        fit(a, (x, y), epochs=1, lr_drop=[0], progress=False)
