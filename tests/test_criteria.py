"""Criteria scores against hand computation; rewinding; regularisers."""

import pytest
import torch
from torch import nn

from prunelab.pruning import L1, L2, GradientMagnitude, GroupLasso, Pruner, make_regularizer, prune
from prunelab.pruning.targets import resolve_targets
from prunelab.training import fit


def test_random_criterion_is_seeded():
    def zeros(seed):
        torch.manual_seed(0)
        model = nn.Linear(20, 20)
        prune(model, 0.5, criterion="random", seed=seed)
        return model.weight == 0

    assert torch.equal(zeros(3), zeros(3))
    assert not torch.equal(zeros(3), zeros(4))
    assert int(zeros(3).sum()) == 200


def test_gradient_criterion_scores_mean_abs_w_times_g():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    x1, x2 = torch.randn(4, 3), torch.randn(5, 3)
    y1, y2 = torch.randn(4, 2), torch.randn(5, 2)
    loss_fn = lambda out, y: (out * y).sum()  # dL/dW = yᵀ x
    w = layer.weight.detach().clone()
    expected = ((w * (y1.T @ x1)).abs() + (w * (y2.T @ x2)).abs()) / 2
    criterion = GradientMagnitude()
    pruner = Pruner(layer, 0.5, criterion=criterion)
    assert pruner.calibrate([(x1, y1), (x2, y2)], loss_fn) == 2
    assert torch.allclose(criterion.scores(pruner.targets)[0], expected)
    pruner.update()
    k = 3
    pruned = layer.weight == 0
    assert int(pruned.sum()) == k
    assert torch.equal(
        pruned.flatten(), torch.zeros(6, dtype=torch.bool).index_fill(0, torch.argsort(expected.flatten())[:k], True)
    )
    assert layer.weight.grad is None  # calibrate restores .grad


def test_gradient_window_observes_only_last_steps_before_each_prune():
    seen = []

    class Spy(GradientMagnitude):
        def scores(self, targets):
            seen.append(self.n_observed)
            return super().scores(targets)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    pruner = Pruner(
        model,
        0.5,
        criterion=Spy(window=3),
        schedule="iterative",
        schedule_args={"n_prunes": 2, "start": 10, "every": 10},
    )
    fit(model, (x, y), epochs=30, batch_size=8, pruner=pruner, progress=False, max_steps=25)
    assert seen == [3, 3]


def test_gradient_without_gradients_is_a_clear_error():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(model, 0.5, criterion="gradient")
    with pytest.raises(ValueError, match="empty calibration set"):
        prune(model, 0.5, criterion="gradient", data=(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="empty calibration set"):
        prune(model, 0.5, criterion="gradient", data=[])
    pruner = Pruner(model, 0.5, criterion="gradient")
    with pytest.raises(ValueError, match="no gradients to score with"):
        pruner.update()


def test_rewind_to_init_resets_survivors_to_initial_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    pruner = Pruner(model, 0.5, schedule="one-shot", schedule_args={"at": 16}, rewind="init")
    fit(model, (x, y), epochs=2, batch_size=8, lr=0.1, pruner=pruner, progress=False)  # 16 steps
    assert len(pruner.history) == 1
    for t in pruner.targets:
        keep = pruner.mask(t.name)
        assert torch.equal(t.weight[keep], initial[t.name][keep])
        assert torch.all(t.weight[~keep] == 0)
    assert torch.equal(model[0].bias, initial["0.bias"])


def test_rewind_to_step_k_uses_weights_after_k_steps():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, 0.5, schedule="one-shot", schedule_args={"at": 6}, rewind=2, optimizer=opt)
    snapshot = None
    for step in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
        if step == 1:
            snapshot = model.weight.detach().clone()
    keep = pruner.mask("weight")
    assert torch.equal(model.weight[keep], snapshot[keep])
    with pytest.raises(ValueError, match="at or before the first pruning event"):
        Pruner(nn.Linear(2, 2), 0.5, schedule_args={"at": 3}, rewind=5)


def test_regularizer_penalties_by_hand():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, -4.0], [0.0, 0.0]]))
    targets = resolve_targets(layer)
    assert L1(0.1).penalty(targets).item() == pytest.approx(0.1 * 7)
    assert L2(0.1).penalty(targets).item() == pytest.approx(0.5 * 0.1 * 25)
    gl = GroupLasso(0.1, granularity="unit")
    penalty = gl.penalty(targets)
    assert penalty.item() == pytest.approx(0.1 * 2**0.5 * 5, rel=1e-6)  # √|g|·‖(3,−4)‖ + 0
    penalty.backward()
    assert torch.isfinite(layer.weight.grad).all()  # finite at the all-zero group
    layer.weight.grad = None
    L2(0.1).penalty(targets).backward()
    assert torch.allclose(layer.weight.grad, 0.1 * layer.weight)  # weight decay 0.1


def test_group_lasso_groups_follow_the_layout_of_hf_conv1d_and_grouped_convs():
    class Conv1D(nn.Module):  # Hugging Face's layout: weight (in, out)
        def __init__(self):
            super().__init__()
            self.nf = 3
            self.weight = nn.Parameter(torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]]))
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return x @ self.weight + self.bias

    targets = resolve_targets(nn.Sequential(Conv1D()))
    # a unit is a column: ‖(3, 4)‖ + ‖(0, 0)‖ + ‖(1, 0)‖ = 6, each group of 2 weights
    assert GroupLasso(1.0, granularity="unit").penalty(targets).item() == pytest.approx(2**0.5 * 6, rel=1e-5)
    # an input channel is a row: ‖(3, 0, 1)‖ + ‖(4, 0, 0)‖, groups of 3
    expected = 3**0.5 * (10**0.5 + 4)
    assert GroupLasso(1.0, granularity="channel").penalty(targets).item() == pytest.approx(expected, rel=1e-5)
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)  # weight (4, 2, 1, 1): two groups of two filters
    with torch.no_grad():
        conv.weight.copy_(torch.arange(1.0, 9.0).reshape(4, 2, 1, 1))
    gl = GroupLasso(1.0, granularity="channel")
    got = gl.penalty(resolve_targets(conv)).item()
    scores = conv.weight.detach().abs()
    by_granularity = gl.granularity.group_scores(scores, "l2", resolve_targets(conv)[0])
    size = gl.granularity.group_size(conv.weight, resolve_targets(conv)[0])
    assert got == pytest.approx(size**0.5 * float(by_granularity.sum()), rel=1e-5)
    assert by_granularity.numel() == 4  # one group per input channel of the layer


def test_l1_training_drives_more_weights_to_near_zero():
    def small_weights(regularizer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 3))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(256, 20, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        fit(
            model,
            (x, y),
            epochs=40,
            batch_size=32,
            lr=0.05,
            regularizer=regularizer,
            reg_strength=1e-3 if regularizer else None,
            progress=False,
        )
        return int((model[0].weight.abs() < 1e-2).sum())

    assert small_weights("l1") > 2 * small_weights(None)


def test_make_regularizer_errors():
    with pytest.raises(ValueError, match="unknown regularizer 'l3'"):
        make_regularizer("l3", 0.1)
    with pytest.raises(ValueError, match="'strength' parameter of l1 regularizer"):
        make_regularizer("l1", -1.0)
    with pytest.raises(ValueError, match="granularity 'kernel' applies only to Conv"):
        make_regularizer("group-lasso", 0.1, granularity="kernel").bind(resolve_targets(nn.Linear(2, 2)))


class _DictLM(nn.Module):
    """Keyword inputs, a dict output with token logits (N, T, V) and an auxiliary class head."""

    def __init__(self, vocab=6, d=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.decoder = nn.Linear(d, vocab)
        self.aux = nn.Linear(d, 2)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return {"logits": self.decoder(h), "aux": self.aux(h.mean(1))}


def _reference_gradient_score(model, loss):
    model.zero_grad()
    loss.backward()
    score = (model.decoder.weight.detach() * model.decoder.weight.grad).abs()
    model.zero_grad()
    return score


def test_gradient_criterion_on_dict_batches_token_logits_and_output_key():
    torch.manual_seed(0)
    model = _DictLM()
    ids = torch.randint(0, 6, (4, 5))
    labels = ids.clone()
    labels[0, 2] = -100
    # HF labels: position t predicts labels[t+1], -100 ignored
    logits = model(ids)["logits"]
    want = _reference_gradient_score(
        model, nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 6), labels[:, 1:].reshape(-1), ignore_index=-100)
    )
    criterion = GradientMagnitude()
    pruner = Pruner(model, 0.5, criterion=criterion, layers=["decoder"])
    pruner.calibrate([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}])
    torch.testing.assert_close(criterion.scores(pruner.targets)[0], want)

    # token ids alone: the next token of the input is the target
    want = _reference_gradient_score(
        model, nn.functional.cross_entropy(model(ids)["logits"][:, :-1].reshape(-1, 6), ids[:, 1:].reshape(-1))
    )
    criterion.reset()
    pruner.calibrate([{"input_ids": ids}])
    torch.testing.assert_close(criterion.scores(pruner.targets)[0], want)

    # output_key names the entry the inferred loss reads; a user loss_fn gets the whole output
    y = torch.tensor([0, 1, 1, 0])
    aux = Pruner(model, 0.5, criterion="gradient", layers=["aux"], output_key="aux")
    aux.calibrate([({"input_ids": ids}, y)])
    model.zero_grad()
    nn.functional.cross_entropy(model(ids)["aux"], y).backward()
    torch.testing.assert_close(aux.criterion.scores(aux.targets)[0], (model.aux.weight * model.aux.weight.grad).abs())
    user = prune(
        _DictLM(),
        0.5,
        criterion="gradient",
        layers=["aux"],
        data=[({"input_ids": ids}, y)],
        loss_fn=lambda out, target: nn.functional.cross_entropy(out["aux"], target),
    )
    assert user.layer_sparsity()["aux.weight"] == 0.5
