"""The narrow solver interface: scopes allocate sparsity across layers (Scope.allocate), and a
criterion that prunes layers whole gets a SolveRequest / LayerProblem, never the Pruner."""

import warnings

import pytest
import torch
from torch import nn

from prunelab.pruning import Pruner
from prunelab.pruning.criteria import Criterion
from prunelab.pruning.problems import LayerProblem, LayerSolution, SolveRequest
from prunelab.pruning.scopes import Event, Global, LayerGroups, LayerwiseConstant, Local, Row, make_scope


def groups(values, alive=None):
    scores = torch.tensor(values, dtype=torch.float32)
    return LayerGroups(scores, torch.ones_like(scores, dtype=torch.bool) if alive is None else torch.tensor(alive), 1)


# ------------------------------------------------------------------ Scope.allocate
def test_local_allocates_the_target_to_every_layer():
    allocation = Local().allocate(3, 0.5, Event(0, final=False))
    assert allocation.sparsities == [0.5, 0.5, 0.5]
    assert allocation.raised == [True, True, True]
    assert allocation.held == ()
    per_layer = Local().allocate(2, [0.2, 0.7], Event(0))
    assert per_layer.sparsities == [0.2, 0.7]


def test_layerwise_constant_allocates_one_layer_per_event_round_robin_then_all():
    scope = LayerwiseConstant()
    raised = [scope.allocate(3, 0.5, Event(i, final=False)).raised for i in range(4)]
    assert raised == [[True, False, False], [False, True, False], [False, False, True], [True, False, False]]
    assert scope.allocate(3, 0.5, Event(1, final=True)).raised == [True, True, True]


def test_global_allocation_is_its_selection_per_layer():
    low = groups([0.1, 0.2, 0.3, 0.4])
    high = groups([1.0, 2.0, 3.0, 4.0, 0.05, 5.0])
    allocation = Global().allocate([low, high], 0.5, Event(0), min_keep=1)
    # the 5 lowest of 10: 0.05 and 0.1..0.4 -> 4 of 4 in the first layer, but one is protected:
    # the guard keeps its best (0.4) and the next lowest of the other layer (1.0) goes instead
    assert allocation.sparsities == [1 - 1 / 4, 1 - 4 / 6]
    assert allocation.raised == [True, True]
    assert allocation.held == ()  # the difference came from the other layer: no shortfall
    keeps = Global().select([low, high], 0.5, Event(0), 1)
    assert allocation.sparsities == [1 - int(k.sum()) / k.numel() for k in keeps]


def test_global_allocation_names_the_layers_the_guard_held():
    a, b = groups([0.1, 0.2, 0.3, 0.4]), groups([1.0, 2.0, 3.0, 4.0])
    allocation = Global().allocate([a, b], 0.9, Event(0), min_keep=2)  # 7 of 8 wanted, 4 allowed
    assert allocation.sparsities == [0.5, 0.5]
    assert allocation.held == (0, 1)
    assert Global().held([a, b], 0.9, Event(0), Global().select([a, b], 0.9, Event(0), 2), 2) == (0, 1)


def test_global_allocation_counts_dead_groups():
    a = groups([0.1, 0.2, 0.3, 0.4], alive=[False, False, True, True])
    b = groups([1.0, 2.0, 3.0, 4.0])
    allocation = Global().allocate([a, b], 0.25, Event(0))
    assert allocation.sparsities == [0.5, 0.0]  # the two dead groups are the target already


def test_global_allocation_needs_the_saliencies():
    with pytest.raises(ValueError, match="allocate\\(\\) takes the layers' LayerGroups"):
        Global().allocate(2, 0.5, Event(0))


def test_local_guard_is_the_scopes_held_layer():
    layer = groups([0.3, 0.1, 0.2])
    keep = Local().select_layer(layer, 1.0, Event(0), 2, 0, 1)
    assert int(keep.sum()) == 2
    assert Local().held_layer(layer, keep, 1.0, Event(0), 2, 0, 1)
    assert not Local().held_layer(layer, Local().select_layer(layer, 0.3, Event(0), 2, 0, 1), 0.3, Event(0), 2, 0, 1)


def test_only_row_refuses_whole_layer_solvers():
    assert [make_scope(n).supports_solvers for n in ("local", "global", "layerwise-constant")] == [True] * 3
    assert not Row().supports_solvers


# ------------------------------------------------------------------ a solver written against the interface
class SmallestFirst(Criterion):
    """A toy solver: prunes each layer's smallest alive weights to its allocated sparsity (no
    compensation), built only on SolveRequest, Scope.allocate and LayerProblem."""

    name = "smallest-first"
    updates_weights = True

    def __init__(self):
        self.seen = []
        self.last_held = ()

    def validate(self, setting) -> None:
        if not setting.scope.supports_solvers:
            raise ValueError(f"scope {setting.scope.name!r} cannot serve a whole-layer solver")

    def solve(self, request):
        assert isinstance(request, SolveRequest) and not isinstance(request, Pruner)
        scope, targets = request.scope, request.targets
        if scope.independent:
            allocation = scope.allocate(len(targets), request.sparsities, request.event, request.min_keep)
        else:
            layers = [
                LayerGroups(t.matrix().detach().abs().flatten(), request.alive(t, t.matrix()).flatten(), 1)
                for t in targets
            ]
            allocation = scope.allocate(layers, request.sparsities[0], request.event, request.min_keep)
        keeps, held = [], [targets[i].name for i in allocation.held]
        for i, target in enumerate(targets):
            if not allocation.raised[i]:
                keeps.append(request.keep(target))
                continue
            solution = self.solve_layer(request.problem(target, allocation.sparsities[i], target.matrix()))
            keeps.append(solution.keep)
            if solution.held:
                held.append(target.name)
        self.last_held = tuple(held)
        return keeps

    def solve_layer(self, problem: LayerProblem) -> LayerSolution:
        self.seen.append(problem)
        W, alive = problem.target.matrix().detach(), problem.alive
        n = W.numel()
        wanted = round(problem.sparsity * n)
        limit = n - min(problem.min_keep, int(alive.sum()))
        scores = W.abs().flatten().masked_fill(~alive.flatten(), -1.0)
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.argsort(scores, stable=True)[: min(wanted, limit)]] = False
        return LayerSolution(keep.reshape(problem.target.weight.shape), None, wanted > limit)


def three_layers():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 2))


@pytest.mark.parametrize("min_keep", [1, 4])
@pytest.mark.parametrize("schedule", ["one-shot", "agp"])
@pytest.mark.parametrize("scope", ["local", "global", "layerwise-constant"])
def test_a_solver_on_the_interface_works_with_every_scope(scope, schedule, min_keep):
    """The toy solver reaches what magnitude pruning through the scope's own selection reaches,
    event by event, held layers included."""
    args = {"n_prunes": 3, "every": 1} if schedule == "agp" else {}
    runs = []
    for criterion in (SmallestFirst(), "magnitude"):
        model = three_layers()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner = Pruner(
                model, 0.95, criterion=criterion, scope=scope, schedule=schedule, schedule_args=args, min_keep=min_keep
            )
            pruner.update()
            for _ in range(4):
                pruner.step()
        runs.append((pruner, [str(w.message) for w in caught]))
    (solver, solver_warnings), (magnitude, magnitude_warnings) = runs
    assert [r.held for r in solver.history] == [r.held for r in magnitude.history]
    assert [r.layers for r in solver.history] == [r.layers for r in magnitude.history]
    for t in solver.targets:
        assert torch.equal(solver.mask(t.name), magnitude.mask(t.name))
    assert solver_warnings == magnitude_warnings
    problems = solver.criterion.seen
    assert problems and all(p.min_keep == min_keep and p.nm is None and not p.structured for p in problems)
    if min_keep == 4 and scope != "global":
        assert solver.history[-1].held  # the guard binds on the 2×5 layer


def test_a_solver_on_the_interface_refuses_scope_row():
    with pytest.raises(ValueError, match="scope 'row' cannot serve a whole-layer solver"):
        Pruner(three_layers(), 0.5, criterion=SmallestFirst(), scope="row")


def test_only_the_one_shot_schedule_declares_one_shot():
    from prunelab.pruning.schedules import make_schedule

    assert make_schedule("one-shot", 0.5).one_shot
    assert not any(make_schedule(name, 0.5, n_prunes=1, every=1).one_shot for name in ("iterative", "agp"))
