"""The study harness under hostile input: bounded specs, one lock per database file whatever
the path, read-only reads, corrupt stores, a killed worker, errors before work, safe writes."""

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prunelab.cli import main
from prunelab.runs.tasks import SpecError
from prunelab.store import Store, StoreError
from prunelab.study import build_study, load_spec
from prunelab.study.lock import StudyLock, StudyLocked

SPEC_TEXT = """\
name: t
datasets: [digits]
models: [{name: mlp, hidden: [16]}]
methods: [{label: magnitude}]
sparsities: [0.8]
seeds: 1
training: {epochs: 1, finetune_epochs: 1, batch_size: 64}
"""


def spec(**changes):
    s = yaml.safe_load(SPEC_TEXT)
    s.update(changes)
    return s


def write(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path_or_spec):
    with pytest.raises(SpecError) as info:
        if isinstance(path_or_spec, Path):
            load_spec(path_or_spec)
        else:
            build_study(path_or_spec)
    return "\n".join(info.value.errors)


# ------------------------------------------------------------------------------- YAML
@pytest.mark.parametrize("field", ["description", "quick"])
def test_an_anchor_bomb_in_a_free_text_field_is_refused(tmp_path, field):
    bomb = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for level in "bcdefghi":  # 9 ** 9 strings once expanded
        previous = chr(ord(level) - 1)
        bomb.append(f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]")
    text = SPEC_TEXT + f"{field}:\n" + "\n".join("  " + line for line in bomb) + "\n"
    errors = errors_of(write(tmp_path, text))
    assert "YAML aliases (*a) are not allowed" in errors and "line " in errors


def test_a_duplicate_key_is_refused_naming_the_key_and_both_lines(tmp_path):
    text = SPEC_TEXT.replace(
        "training: {epochs: 1, finetune_epochs: 1, batch_size: 64}\n", "training:\n  epochs: 1\n  epochs: 5\n"
    )
    errors = errors_of(write(tmp_path, text))
    assert "line 9: duplicate key 'epochs' (first given at line 8)" in errors


def test_deep_nesting_long_numbers_and_odd_tags_are_refused_and_dates_stay_text(tmp_path):
    assert "nested more than 40 levels" in errors_of(
        write(tmp_path, SPEC_TEXT + "description: " + "[" * 500 + "]" * 500 + "\n")
    )
    assert "a number written with 5000 characters" in errors_of(
        write(tmp_path, SPEC_TEXT + "description: " + "1" * 5000 + "\n")
    )
    assert "the YAML tag 'tag:yaml.org,2002:binary' is not allowed" in errors_of(
        write(tmp_path, SPEC_TEXT + "description: !!binary aGVsbG8=\n")
    )
    assert "merge keys" in errors_of(write(tmp_path, SPEC_TEXT + "quick: {<<: {seeds: 1}}\n"))
    study = load_spec(write(tmp_path, SPEC_TEXT + "description: 2024-01-01\n"))
    assert study.spec["description"] == "2024-01-01"  # not a date that JSON cannot store
    with pytest.raises(SpecError, match="YAML aliases"):
        build_study(spec(), overrides=["description=[&a x, *a]"])


def test_a_spec_file_larger_than_the_limit_is_refused_unread(tmp_path):
    path = write(tmp_path, SPEC_TEXT + "description: '" + "x" * (1 << 20) + "'\n")
    assert "larger than 1,048,576 bytes" in errors_of(path)


# ------------------------------------------------------------------------------ bounds
@pytest.mark.parametrize(
    "changes, fragment",
    [
        (
            {"methods": [{"schedule": {"name": "iterative", "n_prunes": 10**9}}]},
            "methods[0].schedule.n_prunes: the 'n_prunes' parameter must be at most 10,000",
        ),
        (
            {"methods": [{"schedule": {"name": "agp", "n_prunes": {"grid": [2, 10**9]}}}]},
            "methods[0].schedule.n_prunes.grid[1]: the 'n_prunes' parameter must be at most 10,000",
        ),
        ({"training": {"epochs": 10**9}}, "training.epochs: the 'epochs' parameter must be at most 10,000"),
        (
            {"methods": [{"training": {"finetune_epochs": 10**9}}]},
            "methods[0].training.finetune_epochs: the 'finetune_epochs' parameter must be at most 10,000",
        ),
        ({"training": {"batch_size": 10**12}}, "the 'batch_size' parameter must be at most 1,048,576"),
        ({"training": {"eval_every": 10**12}}, "the 'eval_every' parameter must be at most 100,000,000"),
        ({"methods": [{"calibration": 10**12}]}, "the 'calibration' parameter must be at most 10,000,000"),
        (
            {"methods": [{"latency": {"rounds": 10**12}}]},
            "methods[0].latency.rounds: the 'rounds' parameter must be at most 1,000,000",
        ),
        ({"methods": [{"latency": {"threads": 10**9}}]}, "the 'threads' parameter must be at most 4,096"),
        (
            {"methods": [{"latency": {"batch_sizes": [1, 10**12]}}]},
            "methods[0].latency.batch_sizes[1]: the 'batch_sizes' parameter must be at most 1,048,576",
        ),
        ({"seeds": 10**6}, "seeds: a count of seeds must be at most 1,000"),
        ({"seeds": list(range(10**6))}, "seeds: 1,000,000 seeds; at most 1,000"),
        ({"seeds": [2**40]}, "the 'seed' parameter must be an int in [0, 4294967295]"),
        ({"sparsities": [0.5] * 5000}, "sparsities: 5,000 levels; at most 1,000"),
        (
            {"models": [{"name": "mlp", "hidden": [10**8]}]},
            "models[0].hidden[0]: the 'hidden' parameter must be at most 1,048,576",
        ),
        ({"models": [{"name": "mlp", "hidden": [20000, 20000]}]}, "more than 268,435,456 (the limit of a model"),
        (
            {"models": [{"name": "mlp", "hidden": [{"grid": list(range(1, 11))}] * 9}]},
            "models[0]: its grids make more than 50,000 variants",
        ),
    ],
)
def test_an_absurd_number_is_refused_before_any_work_with_its_limit(changes, fragment):
    errors = errors_of(spec(**changes))
    assert fragment in errors


def test_the_limits_leave_ordinary_specs_alone():
    study = build_study(
        spec(
            seeds=[0, 2**32 - 1],
            training={"epochs": 10_000, "finetune_epochs": 1},
            methods=[{"schedule": {"name": "iterative", "n_prunes": 3}}],
        )
    )
    assert len(study.runs) == 2


def test_a_table_metric_typo_is_refused_before_the_study_runs(tmp_path, capsys):
    bad = spec(outputs={"tables": [{"rows": "sparsity", "columns": "method", "metric": "accuarcy"}]})
    assert "outputs.tables[0].metric: unknown metric 'accuarcy' (did you mean 'accuracy'?)" in errors_of(bad)
    path = write(tmp_path, yaml.safe_dump(bad))
    assert main(["run", str(path), "--db", str(tmp_path / "study.db")]) == 2
    assert not (tmp_path / "study.db").exists()
    figure = spec(outputs={"figures": [{"kind": "accuracy_vs_sparsity", "metric": "acc"}]})
    assert "outputs.figures[0].metric: unknown metric 'acc'" in errors_of(figure)
    ok = spec(
        outputs={
            "metric": "flops",
            "tables": [{"rows": "sparsity", "columns": "method", "metric": "accuracy_pruned"}],
            "figures": [{"kind": "accuracy_vs_sparsity", "metric": "loss"}],
        }
    )
    assert len(build_study(ok).runs) == 1


# ------------------------------------------------------------------- errors before work
@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--workers", "0"], "the 'workers' parameter of prunelab run must be an int in [1, 1024]. Got 0"),
        (["--workers", "100000"], "must be an int in [1, 1024]. Got 100000"),
        (["--executor", "rya"], "the 'executor' parameter of prunelab run must be one of: local, ray. Got 'rya'"),
        (["--address", "auto"], "applies to --executor ray only"),
    ],
)
def test_bad_executor_options_exit_2_before_the_store_or_lock_exist(tmp_path, capsys, argv, fragment):
    path = write(tmp_path, SPEC_TEXT)
    assert main(["run", str(path), "--db", str(tmp_path / "out" / "study.db"), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def make_study_db(tmp_path, name="study.db"):
    """A real study store with its runs planned (none run)."""
    db = tmp_path / name
    study = build_study(spec())
    with Store(db) as store:
        store.set_meta("spec", study.spec)
        store.sync(study.runs)
    return db


def test_write_failures_exit_4_with_one_line(tmp_path, capsys):
    db = make_study_db(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with Store(db) as store:  # one done run, so that there is a table to write
        (record,) = store.records()
        store.mark_running(record.id, "test")
        store.finish(record.id, {"status": "done", "metrics": {"accuracy": 0.5}})
    assert main(["table", str(db), "--out", str(blocker / "sub")]) == 4
    err = capsys.readouterr().err
    assert "could not create the output folder" in err and "Traceback" not in err
    assert main(["report", str(db), "--out", str(tmp_path)]) == 4  # a folder in the way
    assert "Traceback" not in capsys.readouterr().err
    assert main(["prune", "--json", str(tmp_path), "--epochs", "0", "--finetune-epochs", "0"]) == 4
    assert "could not write --json" in capsys.readouterr().err
    assert main(["prune", "--json", str(blocker / "r.json"), "--epochs", "0", "--finetune-epochs", "0"]) == 4


# ------------------------------------------------------------------------ locks
HOLD = (
    "import sys, time\nfrom prunelab.study.lock import StudyLock\n"
    "with StudyLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)"
)


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_one_lock_per_database_file_through_symlinks_and_hard_links(tmp_path, capsys, link):
    db = make_study_db(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    alias = other / "alias.db"
    if link == "symlink":
        alias.symlink_to(db)
    else:
        os.link(db, alias)
    path = write(tmp_path, SPEC_TEXT)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = db.read_bytes()
        assert main(["run", str(path), "--db", str(alias), "--no-progress"]) == 3
        assert "is already being run by" in capsys.readouterr().err
        with pytest.raises(StudyLocked):
            with StudyLock(alias):
                pass
        second = subprocess.run(
            [sys.executable, "-m", "prunelab.cli", "run", str(path), "--db", str(alias), "--no-progress"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 3, second.stderr
        assert db.read_bytes() == before  # nothing ran, nothing was written
    finally:
        holder.kill()
        holder.wait()
    with StudyLock(alias):  # the kernel freed it with its process
        pass
    if link == "hardlink":  # alone, a second name is still refused for writing: two WAL files
        before = db.read_bytes()
        assert main(["run", str(path), "--db", str(alias), "--no-progress"]) == 2
        assert "has 2 hard links" in capsys.readouterr().err and db.read_bytes() == before
        assert main(["status", str(alias)]) == 0  # reading through it is fine


# --------------------------------------------------------------- read-only, refused files
def fingerprint(path):
    stat = path.stat()
    return path.read_bytes(), stat.st_mtime_ns, sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("kind", ["other-sqlite", "empty", "text"])
def test_commands_refuse_a_file_that_is_not_a_study_and_leave_it_unchanged(tmp_path, capsys, kind):
    target = tmp_path / "data" / "thing.db"
    target.parent.mkdir()
    if kind == "other-sqlite":
        db = sqlite3.connect(target)
        db.execute("CREATE TABLE notes (body TEXT)")
        db.execute("INSERT INTO notes VALUES ('keep me')")
        db.commit()
        db.close()
    elif kind == "empty":
        target.write_bytes(b"")
    else:
        target.write_text("hello\n")
    before = fingerprint(target)
    spec_path = write(tmp_path, SPEC_TEXT)
    commands = [["status", str(target)], ["table", str(target)], ["plot", str(target)], ["report", str(target)]]
    if kind != "empty":  # an empty file is a fresh store for `run`
        commands.append(["run", str(spec_path), "--db", str(target), "--no-progress"])
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert str(target) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert fingerprint(target) == before, argv
    if kind == "other-sqlite":
        db = sqlite3.connect(f"{target.as_uri()}?mode=ro", uri=True)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        db.close()


def test_reading_a_study_does_not_write_to_it(tmp_path, capsys):
    db = make_study_db(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = db.read_bytes(), db.stat().st_mtime_ns
    assert main(["status", str(db)]) == 0
    assert "1 runs: 0 done" in capsys.readouterr().out
    with Store(db, readonly=True) as store:
        assert store.counts()["pending"] == 1
        with pytest.raises(Exception, match="readonly"):
            store.set_meta("x", 1)
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before


def test_a_corrupt_study_gives_one_clear_error_naming_the_file(tmp_path, capsys):
    db = make_study_db(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db.read_bytes())
    page = 4096 if len(data) >= 8192 else 1024
    data[page + 8 :] = b"\xff" * (len(data) - page - 8)  # every page after the first: garbage
    db.write_bytes(bytes(data))
    spec_path = write(tmp_path, SPEC_TEXT)
    for argv in (["status", str(db)], ["table", str(db)], ["run", str(spec_path), "--db", str(db), "--no-progress"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and str(db) in err and "Traceback" not in err, (argv, code, err)
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(StoreError, match="corrupt"):
        Store(db, readonly=True).records()


# ------------------------------------------------------------------- a killed worker
KILL_TEXT = SPEC_TEXT.replace("sparsities: [0.8]", "sparsities: [0.5, 0.6, 0.7, 0.8]").replace(
    "training: {epochs: 1, finetune_epochs: 1, batch_size: 64}",
    "training: {epochs: 6, finetune_epochs: 6, batch_size: 8}",
)


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [
        int(line.split()[0]) for line in out.splitlines() if "multiprocessing.spawn" in line or "spawn_main" in line
    ]


def test_a_killed_worker_fails_only_its_own_run(tmp_path):
    """SIGKILL one of two local workers mid-run: its run fails (WorkerDied), the other worker's
    run in flight finishes, and every queued run still runs in this session."""
    path = write(tmp_path, KILL_TEXT)
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
            "--no-cache",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        victim, running = None, []
        while time.monotonic() < deadline and victim is None:
            time.sleep(0.1)
            if db.exists() and db.stat().st_size:
                try:
                    with Store(db, readonly=True) as store:
                        running = store.records(status="running")
                        done = store.counts()["done"]
                except (StoreError, sqlite3.Error):
                    continue
                workers = children(proc.pid)
                # warm workers (a run is done) holding two runs: both have started theirs
                if done >= 1 and len(running) == 2 and len(workers) == 2:
                    time.sleep(0.3)
                    victim = workers[0]
        assert victim is not None, "two runs never ran at once"
        os.kill(victim, 9)
        assert proc.wait(timeout=180) == 1  # one failed run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with Store(db, readonly=True) as store:
        records = store.records()
    failed = [r for r in records if r.status == "failed"]
    assert len(records) == 4 and len(failed) == 1, [(r.status, r.error) for r in records]
    assert failed[0].error.startswith("WorkerDied")  # its own run (the one it had started then)
    assert all(r.status == "done" for r in records if r is not failed[0])


# ---------------------------------------------------------------------------- safe writes
def test_output_writes_never_follow_a_planted_symlink(tmp_path):
    from prunelab.results.outputs import write_output

    out = tmp_path / "tables"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "tables.md").symlink_to(victim)  # at the final name
    for name in (f".tables.md.{os.getpid()}.part", "tables.md.tmp", ".tables.md.part"):  # at guessable temps
        (out / name).symlink_to(victim)
    write_output(out / "tables.md", "# new table\n")
    assert victim.read_text() == "precious"
    assert not (out / "tables.md").is_symlink() and (out / "tables.md").read_text() == "# new table\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".part") and not p.is_symlink()]  # no leftovers


def test_the_dense_cache_is_not_read_or_written_through_a_planted_symlink(tmp_path):
    import torch

    from prunelab.models import build_model
    from prunelab.runs.prepare import load_dense, save_dense

    model = build_model("mlp", input_shape=(1, 8, 8), n_classes=10, hidden=[4])
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save(
        {
            "state_dict": {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()},
            "history": [],
            "snapshot": None,
        },
        elsewhere,
    )
    before = elsewhere.read_bytes()
    path = tmp_path / "cache" / "dense" / "entry.pt"
    path.parent.mkdir(parents=True)
    path.symlink_to(elsewhere)
    (path.parent / f"entry.pt.{os.getpid()}.tmp").symlink_to(elsewhere)  # the old predictable name
    assert load_dense(path, model) is None  # a symlink is not a cache entry
    assert not any(bool((p == 7.0).all()) for p in model.state_dict().values())
    save_dense(path, model, [{"epoch": 1}], None)
    assert elsewhere.read_bytes() == before and not path.is_symlink()
    fresh = build_model("mlp", input_shape=(1, 8, 8), n_classes=10, hidden=[4], seed=1)
    assert load_dense(path, fresh)["history"] == [{"epoch": 1}]
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
