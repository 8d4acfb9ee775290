"""The SQLite study store: WAL mode, state transitions, concurrent writers."""

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from prunelab.experiments.store import PlannedRun, Store


def planned(n, prefix="r"):
    return [PlannedRun(f"{prefix}{i:04d}", {"i": i}, "digits", "mlp", "m", 0.5, i) for i in range(n)]


def test_wal_mode_and_transitions(tmp_path):
    db = tmp_path / "s.db"
    with Store(db) as store:
        assert store.sync(planned(3)) == 3
        assert store.sync(planned(3)) == 0  # idempotent
        store.mark_running("r0000", "w0")
        store.finish(
            "r0000",
            {"status": "done", "metrics": {"accuracy": 0.5, "c": float("inf"), "n": float("nan")}, "seconds": 1.0},
        )
        store.mark_running("r0001", "w0")
        store.finish("r0001", {"status": "failed", "error": "boom\ntraceback"})
        store.mark_running("r0002", "w1")  # then the process "dies"
        assert store.counts() == {"pending": 0, "running": 1, "done": 1, "failed": 1}
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    with Store(db) as store:
        assert store.reset_interrupted() == 1
        assert [r.id for r in store.pending()] == ["r0002"]
        assert store.retry_failed() == 1
        assert store.counts() == {"pending": 2, "running": 0, "done": 1, "failed": 0}
        done = store.record("r0000")
        assert done.metrics == {"accuracy": 0.5, "c": "inf", "n": None} and done.attempts == 1
        store.sync(planned(2))  # r0002 left the spec: kept, flagged
        assert store.record("r0002").in_spec is False
        assert [r.id for r in store.records(in_spec=None)] == ["r0000", "r0001", "r0002"]
        with pytest.raises(ValueError, match="unknown run status 'finished'"):
            store.records(status="finished")
        with pytest.raises(ValueError, match="must be 'done' or 'failed'"):
            store.finish("r0000", {"status": "ok"})


WRITER = textwrap.dedent("""
    import sys
    from prunelab.experiments.store import Store
    db, start, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with Store(db) as store:
        for i in range(start, start + n):
            rid = f"r{i:04d}"
            store.mark_running(rid, f"writer-{start}")
            store.finish(rid, {"status": "done", "metrics": {"i": i}, "seconds": 0.0})
""")


def test_two_processes_write_concurrently_without_losing_a_row(tmp_path):
    db = tmp_path / "s.db"
    with Store(db) as store:
        store.sync(planned(400))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(start), "200"]) for start in (0, 200)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    with Store(db) as store:
        records = store.records()
        assert store.counts()["done"] == 400
        assert sorted(r.metrics["i"] for r in records) == list(range(400))
        assert {r.worker for r in records} == {"writer-0", "writer-200"}
