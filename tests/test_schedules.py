"""Each schedule's formula at its end points and mid points, and the Pruner following it."""

import math

import pytest
import torch
from torch import nn

from prunelab.pruning import AGP, FixedFraction, FunctionSchedule, Iterative, OneShot, Pruner, make_schedule


def test_one_shot():
    assert OneShot(0.9, at=7).events() == [(7, 0.9)]


def test_iterative_root_schedule_end_and_mid_points():
    s = Iterative(0.9, n_prunes=4, exponent=2, start=10, every=5)
    events = s.events()
    assert [step for step, _ in events] == [10, 15, 20, 25]
    assert events[-1][1] == pytest.approx(0.9)  # i = k → S
    assert events[1][1] == pytest.approx(0.9 * math.sqrt(0.5))  # i = k/2, c = 2 → S·(1/2)^(1/2)
    assert events[0][1] == pytest.approx(0.9 * 0.25**0.5)
    linear = Iterative(0.8, n_prunes=4, exponent=1).events()
    assert [v for _, v in linear] == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_agp_cubic_end_and_mid_points():
    s = AGP(0.9, n_prunes=4, every=100, start=50, initial_sparsity=0.1)
    events = s.events()
    assert [step for step, _ in events] == [50, 150, 250, 350, 450]
    assert events[0][1] == pytest.approx(0.1)  # t = t0 → s_i
    assert events[-1][1] == pytest.approx(0.9)  # t = t0 + nΔt → s_f
    assert events[2][1] == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3)  # midpoint
    assert events[1][1] == pytest.approx(0.9 - 0.8 * 0.75**3)
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(260) == events[2][1] and s.sparsity_at(10**6) == 0.9


def test_fixed_fraction_of_remaining_and_of_layer():
    rem = FixedFraction(0.1, n_prunes=3).events()
    assert [v for _, v in rem] == pytest.approx([0.1, 0.19, 0.271])
    layer = FixedFraction(0.1, n_prunes=3, of="layer").events()
    assert [v for _, v in layer] == pytest.approx([0.1, 0.2, 0.3])
    capped = FixedFraction(0.3, sparsity=0.5).events()
    assert [v for _, v in capped] == pytest.approx([0.3, 0.5])  # 0.51 capped at 0.5


def test_callable_schedule():
    s = make_schedule(lambda step: min(0.9, step / 100), n_prunes=3, every=50)
    assert isinstance(s, FunctionSchedule)
    assert s.events() == [(0, 0.0), (50, 0.5), (100, 0.9)]
    with pytest.raises(ValueError, match=r"fn\(0\).*\[0, 1\)"):
        FunctionSchedule(lambda step: 1.5).events()


def test_pruner_follows_agp_events_and_reaches_each_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 10))
    schedule = AGP(0.8, n_prunes=4, every=10, start=5)
    pruner = Pruner(model, schedule=schedule)
    seen = {}
    for _ in range(60):
        for record in pruner.step():
            seen[record.step] = record.sparsity
    assert sorted(seen) == [5, 15, 25, 35, 45]
    for step, target in schedule.events():
        # 2000 and 400 weights: round(s·n)/n is within 1/(2n) of s in each layer
        assert seen[step] == pytest.approx(target, abs=2e-3)
    assert pruner.done


def test_step_zero_event_applies_on_update_before_training():
    model = nn.Linear(10, 10)
    pruner = Pruner(model, 0.5, schedule="iterative", schedule_args={"n_prunes": 2, "every": 4})
    assert pruner.update()[0].step == 0
    assert pruner.sparsity() == pytest.approx(0.25)
