"""Studies end to end on the embedded digits data: resumable, failure-tolerant, parallel."""

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import yaml

import prunelab
from prunelab.cli import main
from prunelab.store import Store
from prunelab.study import build_study, run_study
from prunelab.study.lock import StudyLock, StudyLocked


def spec(**changes):
    s = {
        "name": "t",
        "datasets": ["digits"],
        "models": [{"name": "mlp", "hidden": [16]}],
        "methods": [
            {"label": "magnitude"},
            {"label": "random", "criterion": "random"},
            {"label": "gradient", "criterion": "gradient"},
        ],
        "sparsities": [0.8],
        "seeds": 2,
        "training": {"epochs": 2, "finetune_epochs": 2, "batch_size": 64},
        "outputs": {"tables": [{"rows": "sparsity", "columns": "method"}]},
    }
    s.update(changes)
    return s


def test_six_run_study_completes_and_table_matches_the_store(tmp_path):
    from prunelab.results.tables import build_tables

    study = build_study(spec())
    assert len(study.runs) == 6
    result = run_study(study, tmp_path / "study.db", progress=False)
    assert result.counts == {"pending": 0, "running": 0, "done": 6, "failed": 0} and result.ran == 6
    with Store(tmp_path / "study.db") as store:
        records = store.records()
        tables = build_tables(records, study.outputs)
    assert all(r.attempts == 1 and r.metrics["sparsity"] == pytest.approx(0.8, abs=2e-3) for r in records)
    assert sum(r.metrics["dense_cached"] for r in records) == 4  # one dense model per seed
    (table,) = tables
    assert table.to_markdown().count("\n") == 2 + 1  # header, rule, one level
    row_key, cells = table.rows[0]
    assert row_key == pytest.approx(0.8)
    for method, cell in zip(table.column_labels, cells):
        accs = [r.metrics["accuracy"] for r in records if r.method == method]
        assert cell.mean == pytest.approx(statistics.fmean(accs))
        assert cell.std == pytest.approx(statistics.stdev(accs))
    # resuming a finished study runs nothing
    again = run_study(study, tmp_path / "study.db", progress=False)
    assert again.ran == 0 and again.counts["done"] == 6


def test_a_run_that_raises_is_recorded_and_the_others_complete(tmp_path, capsys):
    s = spec(methods=[{"label": "ok"}, {"label": "boom", "training": {"lr": 1e12}}], seeds=1)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(s))
    code = main(["run", str(path), "--db", str(tmp_path / "study.db"), "--no-progress"])
    assert code == 1
    with Store(tmp_path / "study.db") as store:
        (ok,) = store.records(status="done")
        (failed,) = store.records(status="failed")
    assert ok.method == "ok" and failed.method == "boom"
    assert failed.error.startswith("TrainingDiverged: training loss became") and "Traceback" in failed.error
    assert "--retry-failed" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "study.db")]) == 0
    assert "failed   " in capsys.readouterr().out
    # without --retry-failed nothing runs again; with it the failed run is retried (and fails again)
    assert main(["run", str(path), "--db", str(tmp_path / "study.db"), "--no-progress"]) == 1
    with Store(tmp_path / "study.db") as store:
        assert store.record(failed.id).attempts == 1
    assert main(["run", str(path), "--db", str(tmp_path / "study.db"), "--no-progress", "--retry-failed"]) == 1
    with Store(tmp_path / "study.db") as store:
        assert store.record(failed.id).attempts == 2 and store.record(ok.id).attempts == 1


def test_invalid_spec_runs_nothing_and_exits_2(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec(methods=[{"criterion": "magnitde"}], sparsities=[1.5])))
    assert main(["run", str(path), "--db", str(tmp_path / "study.db")]) == 2
    err = capsys.readouterr().err
    assert "has 2 errors" in err and "sparsities[0]" in err and "methods[0]" in err
    assert not (tmp_path / "study.db").exists()


def test_a_locked_study_is_refused_with_exit_3(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec(seeds=1)))
    with StudyLock(tmp_path / "study.db"):
        assert main(["run", str(path), "--db", str(tmp_path / "study.db")]) == 3
        assert "already being run by pid" in capsys.readouterr().err
        with pytest.raises(StudyLocked):
            run_study(build_study(spec(seeds=1)), tmp_path / "study.db", progress=False)


KILL_SPEC = spec(
    methods=[{"label": "magnitude"}],
    sparsities=[0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
    seeds=[0, 1],
    training={"epochs": 3, "finetune_epochs": 6, "batch_size": 32},
)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_mid_study_then_restart_finishes_every_run_once(tmp_path, workers):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(KILL_SPEC))
    db = tmp_path / "study.db"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # one run at a time (the batched engine would finish these 12 runs together)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prunelab.cli",
            "run",
            str(path),
            "--db",
            str(db),
            "--no-progress",
            "--workers",
            str(workers),
            "--engine",
            "single",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    done_before = {}
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if db.exists():
            with Store(db) as store:
                done_before = {r.id: r.finished_at for r in store.records(status="done")}
            if len(done_before) >= 4:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert 4 <= len(done_before) < 12, "the study must be killed part-way"
    with Store(db) as store:
        done_at_kill = {r.id: r.finished_at for r in store.records(status="done")}
        assert len(done_at_kill) < 12
    result = run_study(build_study(KILL_SPEC), db, progress=False, engine="single")  # the lock was released
    assert result.counts == {"pending": 0, "running": 0, "done": 12, "failed": 0}
    with Store(db) as store:
        records = store.records()
    assert len(records) == 12
    for record in records:
        if record.id in done_at_kill:  # done before the kill: never run again
            assert record.attempts == 1 and record.finished_at == done_at_kill[record.id]
        else:  # run (or redone) after the restart
            assert record.finished_at > max(done_at_kill.values())
    assert result.ran == 12 - len(done_at_kill)


def test_the_batched_engine_runs_groups_and_records_each_run(tmp_path):
    from prunelab.study.run import plan_jobs

    study = build_study(
        spec(
            methods=[
                {"label": "magnitude"},
                {"label": "random", "criterion": "random"},
                {"label": "sgd-wd", "training": {"weight_decay": 1e-4}},
            ]
        )
    )
    result = run_study(study, tmp_path / "study.db", workers=2, progress=False)
    assert result.counts["done"] == 6
    with Store(tmp_path / "study.db") as store:
        records = store.records()
        jobs = plan_jobs(records)
    # magnitude and random (4 runs) share a group; weight decay runs alone
    assert sorted(len(job.members) for job in jobs) == [1, 1, 4]
    engines = {r.method: r.metrics.get("engine") for r in records}
    assert engines == {"magnitude": "batched", "random": "batched", "sgd-wd": None}
    assert all(r.metrics["sparsity"] == pytest.approx(0.8, abs=2e-3) for r in records)
    assert sum(r.metrics["dense_cached"] for r in records if r.method != "sgd-wd") == 2


def test_on_a_cpu_a_batched_job_is_at_most_one_wave(monkeypatch):
    import torch

    from prunelab.engine import memory
    from prunelab.study.run import plan_jobs

    study = build_study(spec(methods=[{"label": "magnitude"}, {"label": "random", "criterion": "random"}]))
    assert [len(job.members) for job in plan_jobs(study.runs)] == [4]  # one group, one wave
    model = prunelab.build_model("mlp", input_shape=(64,), n_classes=10, hidden=[16])
    per_member = memory.member_bytes(model, (64,), study.runs[0].config["training"]["batch_size"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(memory, "cache_bytes", lambda: 3 * per_member + 1)  # a cache for 3 members
    jobs = plan_jobs(study.runs)
    assert [len(job.members) for job in jobs] == [3, 1]
    assert [m.run_id for job in jobs for m in job.members] == [r.id for r in study.runs]  # each run once, in order


def test_two_local_workers_run_a_study(tmp_path):
    result = run_study(build_study(spec()), tmp_path / "study.db", workers=2, progress=False, engine="single")
    assert result.counts["done"] == 6
    with Store(tmp_path / "study.db") as store:
        records = store.records()
    assert {r.worker for r in records} == {"local-0", "local-1"}
    assert all(r.versions["torch_threads"] == str(max(1, (os.cpu_count() or 1) // 2)) for r in records)


def test_ray_executor_runs_a_small_study_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="ray is the optional extra prunelab[ray]; make test installs it")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_study(
            build_study(spec(seeds=1, methods=[{"label": "magnitude"}, {"label": "random", "criterion": "random"}])),
            tmp_path / "study.db",
            executor="ray",
            progress=False,
        )
    finally:
        ray.shutdown()
    assert result.counts["done"] == 2
    with Store(tmp_path / "study.db") as store:
        records = store.records()
    assert {r.worker for r in records} == {"ray"}
    assert all(0 <= r.metrics["accuracy"] <= 1 for r in records)


def test_sigterm_stops_the_coordinator_and_its_workers_promptly(tmp_path):
    """A polite kill re-queues the runs in flight and ends every process at once, instead of
    waiting for the workers' current runs to finish."""
    path = tmp_path / "s.yaml"
    slow = dict(KILL_SPEC, training={"epochs": 1000, "finetune_epochs": 1, "batch_size": 16})  # minutes per run
    path.write_text(yaml.safe_dump(slow))
    db = tmp_path / "study.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prunelab.cli",
            "run",
            str(path),
            "--db",
            str(db),
            "--no-progress",
            "--workers",
            "2",
            "--engine",
            "single",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until both workers hold a run
        time.sleep(0.2)
        if db.exists():
            with Store(db) as store:
                if store.counts()["running"] == 2:
                    break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 130  # its workers would otherwise finish their runs first
    with Store(db) as store:
        assert store.counts()["running"] == 0 and store.counts()["pending"] == 12
    leftover = subprocess.run(["pgrep", "-f", str(db)], capture_output=True, text=True).stdout.split()
    assert not leftover


def test_a_diverging_member_fails_alone_and_the_rest_of_its_group_completes(tmp_path):
    study = build_study(
        spec(
            seeds=1,
            methods=[
                {"label": "ok", "regularizer": {"name": "l1", "strength": 1e-4}},
                {"label": "boom", "regularizer": {"name": "l1", "strength": 1e38}},
            ],
        )
    )
    from prunelab.study.run import plan_jobs

    assert [len(job.members) for job in plan_jobs(study.runs)] == [2]  # one group
    result = run_study(study, tmp_path / "study.db", progress=False)
    assert result.counts["done"] == 1 and result.counts["failed"] == 1
    with Store(tmp_path / "study.db") as store:
        (failed,) = store.records(status="failed")
        (done,) = store.records(status="done")
    assert failed.method == "boom" and "TrainingDiverged" in failed.error
    assert done.method == "ok" and done.metrics["sparsity"] == pytest.approx(0.8, abs=2e-3)


def test_two_stores_in_one_folder_keep_their_own_tables_and_figures(tmp_path, capsys):
    figures = [{"kind": "accuracy_vs_sparsity"}]
    for name, method in (("a", "magnitude"), ("b", "random")):
        s = spec(name=name, methods=[{"label": method, "criterion": method}], seeds=1)
        s["outputs"]["figures"] = figures
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(s))
        assert main(["run", str(tmp_path / f"{name}.yaml"), "--db", str(tmp_path / f"{name}.db"), "--no-progress"]) == 0
    assert "magnitude" in (tmp_path / "a_tables" / "tables.md").read_text()
    assert "random" in (tmp_path / "b_tables" / "tables.md").read_text()
    assert not (tmp_path / "tables").exists()
    for name in ("a", "b"):
        assert main(["plot", str(tmp_path / f"{name}.db"), "--format", "png"]) == 0
        assert list((tmp_path / f"{name}_figures").glob("*.png"))
    # a store named study.db keeps the layout `prunelab run` makes: tables/ and figures/ beside it
    (tmp_path / "c").mkdir()
    assert main(["run", str(tmp_path / "a.yaml"), "--db", str(tmp_path / "c" / "study.db"), "--no-progress"]) == 0
    assert main(["plot", str(tmp_path / "c" / "study.db"), "--format", "png"]) == 0
    assert (tmp_path / "c" / "tables" / "tables.md").is_file() and list((tmp_path / "c" / "figures").glob("*.png"))
