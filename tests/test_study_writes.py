"""Write failures during a study: a full disk or an unwritable path fails that write cleanly,
the store stays readable, and running the same command again completes the study."""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import subprocess
import sys
from contextlib import contextmanager

import pytest
import yaml

from prunelab.cli import main
from prunelab.experiments import Store, build_study, lock, run_study
from prunelab.experiments.store import PlannedRun, StudyWriteError
from prunelab.experiments.tables import write_tables

SPEC = {
    "name": "w",
    "datasets": ["digits"],
    "models": [{"name": "mlp", "hidden": [8]}],
    "methods": [{"label": "magnitude"}],
    "sparsities": [0.5, 0.9],
    "seeds": 2,
    "training": {"epochs": 1, "finetune_epochs": 1, "batch_size": 128},
}
OUTCOME_SQL = "UPDATE runs SET status = ?, metrics"  # Store.finish's statement


class FailingConnection:
    """A sqlite3 connection whose statements starting with ``prefix`` raise ``error`` from the
    ``after + 1``-th one on (the earlier ones run)."""

    def __init__(self, db, prefix: str, error: BaseException, after: int = 0):
        self._db, self.prefix, self.error, self.left = db, prefix, error, after

    def execute(self, sql, *params):
        if sql.startswith(self.prefix):
            if self.left == 0:
                raise self.error
            self.left -= 1
        return self._db.execute(sql, *params)

    def __getattr__(self, name):
        return getattr(self._db, name)


@contextmanager
def failing_store(monkeypatch, prefix: str, error: BaseException, after: int = 0):
    """Every Store opened inside the block fails its ``after + 1``-th ``prefix`` statement."""
    original = Store.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._db = FailingConnection(self._db, prefix, error, after)

    with monkeypatch.context() as patch:
        patch.setattr(Store, "__init__", init)
        yield


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def finished(db):
    with Store(db) as store:
        return {r.id: (r.attempts, r.finished_at) for r in store.records(status="done")}


def test_a_full_disk_mid_study_stops_it_cleanly_and_a_rerun_completes(tmp_path, monkeypatch):
    db = tmp_path / "study.db"
    study = build_study(SPEC)
    with failing_store(monkeypatch, OUTCOME_SQL, enospc(), after=2):
        with pytest.raises(
            StudyWriteError,
            match=r"could not record the outcome of run [0-9a-f]{16} in the "
            r"study store .*study\.db: No space left on device \(ENOSPC\)",
        ):
            run_study(study, db, progress=False, engine="single")
    with Store(db) as store:  # readable; the interrupted run is back to pending
        assert store.counts() == {"pending": 2, "running": 0, "done": 2, "failed": 0}
        interrupted = [r for r in store.records(status="pending") if r.attempts == 1]
        assert len(interrupted) == 1 and interrupted[0].metrics is None
    done_before = finished(db)
    result = run_study(study, db, progress=False, engine="single")
    assert result.counts == {"pending": 0, "running": 0, "done": 4, "failed": 0} and result.ran == 2
    after = finished(db)
    assert all(after[run_id] == done_before[run_id] for run_id in done_before)  # kept, not redone
    assert after[interrupted[0].id][0] == 2


def test_sqlite_reporting_a_full_database_is_a_clean_stop_with_exit_4(tmp_path, monkeypatch, capsys):
    """A real ``SQLITE_FULL``: the database may not grow by one page more after two runs."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    db = tmp_path / "study.db"
    original = Store.finish
    calls = []

    def finish(self, run_id, outcome):
        calls.append(run_id)
        if len(calls) == 3:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            self._db.execute(f"PRAGMA max_page_count = {pages}")
        return original(self, run_id, outcome)

    with monkeypatch.context() as patch:
        patch.setattr(Store, "finish", finish)
        code = main(["run", str(path), "--db", str(db), "--no-progress", "--engine", "single"])
    err = capsys.readouterr().err
    assert code == 4
    assert "prunelab: error: could not record the outcome of run" in err and "database or disk is full" in err
    assert "run the same command again" in err and "Traceback" not in err
    with Store(db) as store:
        counts = store.counts()
    assert counts["done"] == 2 and counts["failed"] == 0 and counts["done"] + counts["pending"] + counts["running"] == 4
    assert main(["run", str(path), "--db", str(db), "--no-progress", "--engine", "single"]) == 0
    with Store(db) as store:
        assert store.counts()["done"] == 4


def test_a_failed_commit_is_rolled_back_and_the_store_stays_usable(tmp_path):
    run = PlannedRun("a" * 16, {"x": 1}, "d", "m", "k", 0.5, 0)
    with Store(tmp_path / "study.db") as store:
        store.sync([run])
        store.mark_running(run.id, "w")
        real = store._db
        store._db = FailingConnection(real, "COMMIT", sqlite3.OperationalError("database or disk is full"))
        with pytest.raises(
            StudyWriteError,
            match="could not record the outcome of run a{16} .*database or disk is full; nothing was half-written",
        ):
            store.finish(run.id, {"status": "done", "metrics": {"accuracy": 1.0}})
        store._db = real
        assert not real.in_transaction  # rolled back, not left open
        assert store.record(run.id).status == "running" and store.record(run.id).metrics is None
        store.finish(run.id, {"status": "done", "metrics": {"accuracy": 1.0}})
        assert store.record(run.id).status == "done"


def test_an_unwritable_store_path_is_refused_before_any_run(tmp_path, capsys):
    blocker = tmp_path / "results"
    blocker.write_text("a file where a folder should be")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    assert main(["run", str(path), "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the study store {blocker}/w/study.db: {blocker} is a file, not a folder" in err
    with pytest.raises(ValueError, match="is a folder"):
        run_study(build_study(SPEC), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "s.yaml"]  # nothing created


def test_outputs_that_cannot_be_written_lose_no_run_and_exit_4(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    db = tmp_path / "study.db"
    (tmp_path / "tables").write_text("in the way")  # `prunelab run` writes tables/ next to the store
    assert main(["run", str(path), "--db", str(db), "--no-progress"]) == 4
    err = capsys.readouterr().err
    assert f"could not create the output folder {tmp_path / 'tables'}" in err and "stored runs are unaffected" in err
    with Store(db) as store:
        assert store.counts()["done"] == 4
    with pytest.raises(StudyWriteError, match="could not create the output folder"):
        write_tables(db, tmp_path / "tables" / "sub")
    assert main(["table", str(db), "--out", str(tmp_path / "elsewhere"), "--quiet"]) == 0


def test_a_table_write_that_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    db = tmp_path / "study.db"
    run_study(build_study(dict(SPEC, seeds=1, sparsities=[0.5])), db, progress=False)
    out = tmp_path / "tables"
    write_tables(db, out, formats=["md"])
    before = (out / "tables.md").read_bytes()

    def replace(src, dst):
        raise enospc()

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StudyWriteError, match=r"could not write .*tables\.md: No space left on device"):
        write_tables(db, out, formats=["md"])
    monkeypatch.undo()
    assert (out / "tables.md").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["tables.md"]


def test_a_second_process_running_the_same_study_is_refused(tmp_path, capsys, monkeypatch):
    flags, real_flock = [], fcntl.flock  # refused at once: every flock the run asks for is non-blocking
    monkeypatch.setattr(lock.fcntl, "flock", lambda fd, op: (flags.append(op), real_flock(fd, op))[1])
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    db = tmp_path / "study.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom prunelab.experiments.lock import StudyLock\n"
            "with StudyLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)",
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["run", str(path), "--db", str(db)]) == 3
        assert flags and all(op & fcntl.LOCK_NB for op in flags)
        assert f"already being run by pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert main(["run", str(path), "--db", str(db), "--no-progress"]) == 0  # the kernel freed the lock
