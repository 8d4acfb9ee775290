"""Mask invariants: pruned weights stay exactly zero; the model stays a plain nn.Module."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from prunelab.pruning import Pruner, prune


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 20), nn.ReLU(), nn.Linear(20, 5)
    )


def batch(seed=1, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


class NoisySGD(torch.optim.SGD):
    """An optimiser that moves every entry, zero gradient or not: only the
    post-step re-masking can keep pruned weights at zero under it."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=1e-3)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True, weight_decay=1e-3),
        lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1, weight_decay=1e-3),
        lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=1e-3),
        lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-3, decoupled_weight_decay=True),
        lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=1e-3),
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-2),
        lambda p: NoisySGD(p, lr=0.05),
    ],
    ids=[
        "sgd-momentum-wd",
        "sgd-nesterov",
        "adam",
        "adamw",
        "rmsprop",
        "adagrad",
        "adamax",
        "nadam",
        "radam",
        "adam-amsgrad",
        "noisy-custom",
    ],
)
@pytest.mark.parametrize("granularity", ["weight", "filter"])
def test_zeros_stay_zero_through_100_steps(make_opt, granularity):
    model = small_net()
    opt = make_opt(model.parameters())
    x, y = batch()
    for _ in range(5):  # build up optimiser state before pruning
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pruner = Pruner(model, 0.8, granularity=granularity, optimizer=opt)
    pruner.update()
    zero_masks = {t.name: (t.weight == 0).clone() for t in pruner.targets}
    assert all(m.float().mean() > 0.75 for m in zero_masks.values())
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for t in pruner.targets:
        pruned = zero_masks[t.name]
        assert torch.all(t.weight[pruned] == 0), t.name
        assert torch.all(t.weight[~pruned] != 0), t.name  # survivors really trained
        for key, value in opt.state[t.weight].items():
            if torch.is_tensor(value) and value.shape == t.weight.shape:
                # Adamax's exp_inf = max(β2·exp_inf, |g| + eps) floors at eps = 1e-8: no gradient memory
                assert torch.all(value[pruned].abs() <= 1e-8), f"{t.name} state {key} grew back"


def test_without_optimizer_hooks_apply_masks_restores_zeros():
    model = small_net()
    pruner = prune(model, 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # not attached
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert pruner.sparsity() < 0.5  # plain SGD regrows pruned entries
    pruner.apply_masks()
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-3)


def test_output_equals_dense_model_with_those_zeros():
    model = small_net()
    reference = copy.deepcopy(model)
    pruner = prune(model, 0.7, granularity="weight", scope="global")
    with torch.no_grad():
        for t in pruner.targets:
            keep = pruner.mask(t.name)
            ref_weight = dict(reference.named_parameters())[t.name]
            ref_weight.mul_(keep)
    x, _ = batch(n=4)
    assert torch.equal(model(x), reference(x))


def test_model_stays_plain_module():
    model = small_net()
    keys = list(model.state_dict())
    params_before = [id(p) for p in model.parameters()]
    pruner = prune(model, 0.6, granularity="filter")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner.attach(opt)
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params_before
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert not any(name.endswith(("_orig", "_mask")) for name, _ in m.named_parameters(recurse=False))
        assert not any(name.endswith("_mask") for name, _ in m.named_buffers(recurse=False))


def test_pickle_deepcopy_state_dict_round_trip():
    model = small_net()
    prune(model, 0.75, scope="global")
    x, _ = batch(n=4)
    expected = model(x)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(x), expected)
    copied = copy.deepcopy(model)
    assert torch.equal(copied(x), expected)
    fresh = small_net(seed=123)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), expected)
    zeros = sum(int((p == 0).sum()) for p in fresh.parameters())
    assert zeros == sum(int((p == 0).sum()) for p in model.parameters())


def test_pruner_state_dict_restores_masks_in_new_pruner():
    model = small_net()
    pruner = Pruner(model, 0.5, schedule="iterative", schedule_args={"n_prunes": 2, "every": 3})
    for _ in range(4):
        pruner.step()
    state = pruner.state_dict()
    other = Pruner(model, 0.5, schedule="iterative", schedule_args={"n_prunes": 2, "every": 3})
    other.load_state_dict(state)
    assert other.step_count == 4 and other.done
    for t in pruner.targets:
        assert torch.equal(other.mask(t.name), pruner.mask(t.name))
