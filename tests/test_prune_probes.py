"""The prune task's probes: ``accuracy_last_prune`` (right after a schedule's last event) and
``training.report_at_steps`` (``accuracy_at_<k>``, k fine-tuning steps after it), on digits."""

import pytest

from prunelab.results.report import output_metric_problems
from prunelab.runs.batched import execute_prune_group, why_not_batched
from prunelab.runs.prune import PruneTask, execute_prune
from prunelab.study import build_study

TRAIN = {"epochs": 1, "finetune_epochs": 1, "batch_size": 64, "lr": 0.05}  # digits: 23 steps an epoch


def spec(method=None, **training):
    return {
        "name": "probes",
        "datasets": [{"name": "digits"}],
        "models": [{"name": "mlp", "hidden": [16]}],
        "methods": [method or {"label": "magnitude"}],
        "sparsities": [0.9],
        "seeds": 1,
        "training": {**TRAIN, **training},
    }


ITERATIVE = {"label": "iterative", "schedule": {"name": "iterative", "n_prunes": 2, "every": 6}}


def curve_at(metrics, step):
    return dict(metrics["retrain_curve"])[step]


def test_one_shot_records_accuracy_last_prune_equal_to_accuracy_pruned_and_the_accuracies_at_steps():
    [run] = build_study(spec(report_at_steps=[7, 3], retrain_tolerance=0.001, eval_every=1)).runs
    assert run.config["training"]["report_at_steps"] == [3, 7]  # sorted
    metrics = execute_prune(run.config)["metrics"]
    assert metrics["accuracy_last_prune"] == metrics["accuracy_pruned"]
    # the retraining monitor evaluates every step here: the probes agree with its curve
    assert metrics["accuracy_at_3"] == curve_at(metrics, 3)
    assert metrics["accuracy_at_7"] == curve_at(metrics, 7)
    assert not any(key.startswith("accuracy_at_") for key in set(metrics) - {"accuracy_at_3", "accuracy_at_7"})


def test_an_iterative_schedule_records_the_accuracy_right_after_its_last_prune_and_counts_steps_from_it():
    [run] = build_study(spec(ITERATIVE, report_at_steps=[5], retrain_tolerance=0.001, eval_every=1)).runs
    metrics = execute_prune(run.config)["metrics"]
    # step 6 is evaluated after the Pruner's second event of that step (fit calls the Pruner first)
    assert metrics["accuracy_last_prune"] == curve_at(metrics, 6)
    assert metrics["accuracy_at_5"] == curve_at(metrics, 11)
    assert metrics["accuracy_pruned"] != metrics["accuracy_last_prune"]  # the first, lighter prune


def test_accuracy_last_prune_is_recorded_without_report_at_steps_or_a_monitor():
    [run] = build_study(spec(ITERATIVE)).runs
    metrics = execute_prune(run.config)["metrics"]
    assert 0.0 <= metrics["accuracy_last_prune"] <= 1.0
    assert "retrain_curve" not in metrics and not any(k.startswith("accuracy_at_") for k in metrics)


def test_report_at_steps_is_resolved_only_when_given_so_older_runs_keep_their_ids():
    plain = build_study(spec()).runs[0]
    assert "report_at_steps" not in plain.config["training"]
    assert build_study(spec(report_at_steps=None)).runs[0].id == plain.id
    assert build_study(spec(report_at_steps=[])).runs[0].id == plain.id
    given = build_study(spec(report_at_steps=[5])).runs[0]
    assert given.id != plain.id and given.config["training"]["report_at_steps"] == [5]


def test_runs_with_report_at_steps_stay_out_of_the_batched_engine():
    [run] = build_study(spec(report_at_steps=[5])).runs
    assert "report_at_steps" in why_not_batched(run.config)
    [plain] = build_study(spec()).runs
    assert why_not_batched(plain.config) is None


def test_the_batched_engine_records_accuracy_last_prune_for_a_one_shot_schedule_only():
    [one_shot] = build_study(spec()).runs
    [iterative] = build_study(spec(ITERATIVE)).runs
    [got] = execute_prune_group([one_shot.config])
    assert got["metrics"]["accuracy_last_prune"] == got["metrics"]["accuracy_pruned"]
    [got] = execute_prune_group([iterative.config])
    assert "accuracy_last_prune" not in got["metrics"]  # documented: the engine has no probe


@pytest.mark.parametrize(
    "value, message",
    [
        ([0], r"report_at_steps\[0\].*at least 1|report_at_steps\[0\]"),
        ([2.5], r"report_at_steps\[0\]"),
        (510, r"training\.report_at_steps: must be a list of step counts"),
        ([30], r"report_at_steps asks for the accuracy 30 steps after the last prune \(step 0\), at step 30, "),
    ],
)
def test_bad_report_at_steps_are_spec_errors(value, message):
    with pytest.raises(ValueError, match=message):
        build_study(spec(report_at_steps=value))


def test_report_at_steps_counts_from_the_last_prune_when_checked_against_the_budget():
    build_study(spec(report_at_steps=[23]))  # one epoch: 23 steps
    build_study(spec(ITERATIVE, report_at_steps=[17]))
    with pytest.raises(ValueError, match=r"after the last prune \(step 6\), at step 24"):
        build_study(spec(ITERATIVE, report_at_steps=[18]))


@pytest.mark.parametrize(
    "method",
    [
        {"label": "HashedNet", "task": "hashed"},
        {"label": "probes", "task": "unit-penalty"},
        {"label": "mrs", "task": "unit-iterative", "method": "mrs"},
    ],
    ids=lambda m: m["task"],
)
def test_report_at_steps_is_refused_by_the_other_tasks(method):
    build_study(spec(method))  # the method itself is fine
    with pytest.raises(ValueError, match=r"methods\[0\]: 'training.report_at_steps' applies to the prune task only"):
        build_study(spec(method, report_at_steps=[5]))


def test_tables_may_name_the_new_metrics_before_any_run():
    known = PruneTask.metrics
    outputs = {
        "tables": [
            {"rows": "method", "columns": "model", "metric": "accuracy_last_prune"},
            {"rows": "method", "columns": "model", "metric": "accuracy_at_510"},
        ]
    }
    assert output_metric_problems(outputs, known) == []
    bad = {"tables": [{"rows": "method", "columns": "model", "metric": "accuracy_at_x"}]}
    [problem] = output_metric_problems(bad, known)
    assert "unknown metric 'accuracy_at_x'" in problem
