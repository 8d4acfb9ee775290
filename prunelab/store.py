"""The study store: one SQLite file per study.

Every run of a study is one row: its id (a hash of its resolved config), the
config as JSON, its labels (dataset, model, method, sparsity, seed) for
querying, its status, and once finished its metrics, per-epoch curve, error
text, timings and software versions.

Durability: the file is in WAL mode with ``synchronous=FULL``, and every state
change is its own transaction, so a process killed at any instant (SIGKILL,
power loss) leaves either the old or the new state of each run, never half of
one. Runs left ``running`` by a dead process are put back to ``pending`` when
the study is run again (:meth:`Store.reset_interrupted`); ``done`` runs are
never redone. Several processes may write at once (``busy_timeout`` makes a
writer wait for another's transaction instead of failing).

Before SQLite touches a file, :func:`inspect_store` reads its header and (read-only) its
schema: a file that is not a SQLite database, another application's database or a corrupt
store is refused with a :class:`StoreError` naming it, and left as it was. ``Store(path,
readonly=True)`` (``prunelab status | table | plot | report``) opens a connection that cannot
write: no WAL switch, no tables created.

A write that fails (a full disk, a read-only or vanished folder: ``OSError`` or
SQLite's ``database or disk is full`` / ``disk I/O error``) is rolled back, so the
store keeps the state before it, and raised as :class:`StudyWriteError` naming the
file and the change that was lost.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

from prunelab._validation import PATH, Interval, validate_params

STATUSES = ("pending", "running", "done", "failed")


class StudyWriteError(OSError):
    """A study's store or one of its outputs could not be written (disk full, unwritable
    folder). Whatever was stored before is intact; the failed change was not made."""


def write_failure(what: str, path: Path | str, err: BaseException, advice: str) -> StudyWriteError:
    """The :class:`StudyWriteError` for failing to do ``what`` to ``path`` because of ``err``."""
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    code = getattr(err, "errno", None)
    if code is not None and code in errno.errorcode:
        reason = f"{reason} ({errno.errorcode[code]})"
    failure = StudyWriteError(f"could not {what} {path}: {reason}; {advice}")
    failure.errno = code
    return failure


class StoreError(ValueError):
    """A file that cannot be used as a study store: not one (another file, another SQLite
    database, an empty file where a study is read), or a corrupt one. Names the file."""


SQLITE_HEADER = b"SQLite format 3\x00"
REQUIRED_COLUMNS = {
    "meta": {"key", "value"},
    "runs": {
        "id",
        "position",
        "config",
        "dataset",
        "model",
        "method",
        "sparsity",
        "seed",
        "status",
        "in_spec",
        "attempts",
        "metrics",
        "curve",
        "error",
        "worker",
        "started_at",
        "finished_at",
        "seconds",
        "versions",
    },
}


def corrupt(path: Path | str, err: BaseException | str) -> StoreError:
    return StoreError(
        f"the study store {path} is corrupt or not a study store ({err}); it was not "
        f"changed. Restore it from a copy, or move it away and run the study again."
    )


def inspect_store(path: str | Path) -> str:
    """What is at ``path``, found without changing it: ``"missing"``, ``"empty"`` (a 0-byte
    file, or a SQLite database without tables) or ``"study"``. Anything else (a folder, a file
    that is not SQLite, another application's database, a corrupt store) raises
    :class:`StoreError` naming the file. Reads the file's header, then its schema read-only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return "missing"
    except IsADirectoryError:
        raise StoreError(f"the study store {path} is a folder, not a file.") from None
    except OSError as err:
        raise StoreError(f"cannot read the study store {path}: {err.strerror or err}.") from None
    if not head:
        return "empty"
    if head != SQLITE_HEADER:
        raise StoreError(
            f"{path} is not a prunelab study database (not a SQLite database); it was not changed. Choose another --db."
        )
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            columns = {
                name: {row[1] for row in db.execute(f"PRAGMA table_info('{name}')")}
                for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                if name.isidentifier()
            }
        finally:
            db.close()
    except sqlite3.OperationalError as err:
        raise StoreError(f"cannot read the study store {path}: {err}.") from None
    except sqlite3.DatabaseError as err:
        raise corrupt(path, err) from None
    if not columns:
        return "empty"
    missing = {table: sorted(cols - columns.get(table, set())) for table, cols in REQUIRED_COLUMNS.items()}
    if any(missing.values()):
        have = ", ".join(sorted(columns)) or "none"
        raise StoreError(
            f"{path} is not a prunelab study database (it has no 'runs' and 'meta' tables); "
            f"its tables: {have}; it was not changed. Choose another --db."
        )
    return "study"


def _refuse_hard_links(path: Path) -> None:
    """SQLite keeps a store's write-ahead log next to the *name* it was opened by, so two hard
    links to one store have two logs and can lose each other's commits: writing is refused
    (reading is safe). A symlink is fine: SQLite resolves it to the one real name."""
    try:
        links = os.stat(path).st_nlink
    except FileNotFoundError:
        return
    if links > 1:
        raise StoreError(
            f"the study store {path} has {links} hard links; SQLite keeps its write-ahead log "
            f"next to the name it is opened by, so writing through two names can lose commits. "
            f"Keep one name (remove the other links, or copy the file) and run again."
        )


def _is_write_failure(err: BaseException) -> bool:
    """OS errors, and the SQLite errors a full disk or an unwritable file gives (not, e.g., a
    constraint violation, which is a bug to see as such)."""
    return isinstance(err, (OSError, sqlite3.OperationalError))


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id          TEXT PRIMARY KEY,
    position    INTEGER NOT NULL,
    config      TEXT NOT NULL,
    dataset     TEXT NOT NULL,
    model       TEXT NOT NULL,
    method      TEXT NOT NULL,
    sparsity    REAL NOT NULL,
    seed        INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    in_spec     INTEGER NOT NULL DEFAULT 1,
    attempts    INTEGER NOT NULL DEFAULT 0,
    metrics     TEXT,
    curve       TEXT,
    error       TEXT,
    worker      TEXT,
    started_at  REAL,
    finished_at REAL,
    seconds     REAL,
    versions    TEXT
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, in_spec, position);
"""


def dumps(value: Any) -> str:
    """JSON with NaN/inf written as null / "inf" / "-inf" (portable JSON, no NaN literals)."""
    return json.dumps(_portable(value), sort_keys=True, separators=(",", ":"))


def digest(value: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of SHA-256 of ``value``'s canonical JSON."""
    return hashlib.sha256(dumps(value).encode()).hexdigest()[:length]


def _portable(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v) for v in value]
    return value


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True)
class PlannedRun:
    """A run of the study's expansion, before it is stored."""

    id: str
    config: dict
    dataset: str
    model: str
    method: str
    sparsity: float
    seed: int


@dataclass(frozen=True)
class RunRecord:
    """One stored run. ``metrics`` and ``curve`` are None until it finishes."""

    id: str
    position: int
    config: dict
    dataset: str
    model: str
    method: str
    sparsity: float
    seed: int
    status: str
    in_spec: bool
    attempts: int
    metrics: dict | None
    curve: list | None
    error: str | None
    worker: str | None
    started_at: float | None
    finished_at: float | None
    seconds: float | None
    versions: dict | None


class Store:
    """A study's SQLite file. Use as a context manager or call :meth:`close`."""

    @validate_params({"path": [PATH], "timeout": [Interval(Real, 0, 86_400)], "readonly": [bool]})
    def __init__(self, path: str | Path, *, timeout: float = 60.0, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        kind = inspect_store(self.path)  # before SQLite touches it: refuse what is not a store
        if readonly:
            if kind != "study":
                what = "no file" if kind == "missing" else "an empty file"
                raise StoreError(
                    f"{self.path} is not a prunelab study database ({what}); run `prunelab run SPEC.yaml` first."
                )
            self._open_readonly(timeout)
            return
        _refuse_hard_links(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except (OSError, sqlite3.OperationalError) as err:
            raise write_failure(
                "open the study store", self.path, err, "check that its folder exists and can be written"
            ) from err
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise ValueError(
                    f"{self.path}: SQLite could not switch to WAL mode (got {mode!r}); "
                    f"is the folder on a network file system?"
                )
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            with self._transaction("create the tables of"):
                for statement in _statements(SCHEMA):
                    self._db.execute(statement)
        except sqlite3.DatabaseError as err:
            self._db.close()
            if isinstance(err, sqlite3.OperationalError):
                raise write_failure(
                    "open the study store", self.path, err, "check that the file and its folder can be written"
                ) from err
            raise corrupt(self.path, err) from None
        except BaseException:
            self._db.close()
            raise

    def _open_readonly(self, timeout: float) -> None:
        """A connection that cannot write: no WAL switch, no tables made, nothing changed."""
        try:
            self._db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout, isolation_level=None
            )
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        except sqlite3.DatabaseError as err:
            raise corrupt(self.path, err) from None

    def _read(self, sql: str, params: Sequence = ()) -> sqlite3.Cursor:
        """Run a query; a corrupt file becomes a :class:`StoreError` naming it."""
        try:
            return self._db.execute(sql, params)
        except sqlite3.OperationalError as err:  # locked past busy_timeout, an unreadable file
            raise StoreError(f"cannot read the study store {self.path}: {err}.") from None
        except sqlite3.DatabaseError as err:
            raise corrupt(self.path, err) from None

    def _rows(self, sql: str, params: Sequence = ()) -> list[RunRecord]:
        try:
            cursor = self._read(sql, params)
            names = [d[0] for d in cursor.description]
            return [_record(dict(zip(names, row))) for row in cursor.fetchall()]
        except sqlite3.OperationalError as err:
            raise StoreError(f"cannot read the study store {self.path}: {err}.") from None
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError) as err:
            if isinstance(err, StoreError):
                raise
            raise corrupt(self.path, err) from None

    # ------------------------------------------------------------------ plumbing
    def _transaction(self, what: str = "write to"):
        return _Transaction(self._db, self.path, what)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------- meta
    def set_meta(self, key: str, value: Any) -> None:
        with self._transaction(f"record the study's {key!r} in"):
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, dumps(value)),
            )

    def meta(self, key: str, default: Any = None) -> Any:
        row = self._read("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        try:
            return default if row is None else json.loads(row[0])
        except (ValueError, TypeError) as err:
            raise corrupt(self.path, f"meta {key!r}: {err}") from None

    # ------------------------------------------------------------------ planning
    def sync(self, runs: Sequence[PlannedRun]) -> int:
        """Make the store match a spec's expansion: insert new runs as pending, update
        the order of known ones, and flag runs no longer in the spec (kept, not deleted).
        Returns the number of new runs."""
        with self._transaction("record the spec's runs in"):
            known = {row[0] for row in self._db.execute("SELECT id FROM runs")}
            self._db.execute("UPDATE runs SET in_spec = 0")
            new = 0
            for position, run in enumerate(runs):
                if run.id in known:
                    self._db.execute("UPDATE runs SET in_spec = 1, position = ? WHERE id = ?", (position, run.id))
                else:
                    new += 1
                    self._db.execute(
                        "INSERT INTO runs (id, position, config, dataset, model, method, sparsity, seed, "
                        "status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
                        (
                            run.id,
                            position,
                            dumps(run.config),
                            run.dataset,
                            run.model,
                            run.method,
                            float(run.sparsity),
                            int(run.seed),
                        ),
                    )
        return new

    def reset_interrupted(self) -> int:
        """Runs left ``running`` by a process that died go back to ``pending``."""
        with self._transaction("re-queue interrupted runs in"):
            return self._db.execute(
                "UPDATE runs SET status = 'pending', worker = NULL WHERE status = 'running'"
            ).rowcount

    def retry_failed(self) -> int:
        """Failed runs of the current spec go back to ``pending``."""
        with self._transaction("re-queue failed runs in"):
            return self._db.execute(
                "UPDATE runs SET status = 'pending', error = NULL WHERE status = 'failed' AND in_spec = 1"
            ).rowcount

    def pending(self) -> list[RunRecord]:
        return self.records(status="pending")

    # ------------------------------------------------------------------- running
    def mark_running(self, run_id: str, worker: str) -> None:
        with self._transaction(f"mark run {run_id} running in"):
            self._db.execute(
                "UPDATE runs SET status = 'running', attempts = attempts + 1, worker = ?, started_at = ? WHERE id = ?",
                (worker, time.time(), run_id),
            )

    def mark_pending(self, run_id: str) -> None:
        with self._transaction(f"put run {run_id} back to pending in"):
            self._db.execute(
                "UPDATE runs SET status = 'pending', worker = NULL WHERE id = ? AND status = 'running'", (run_id,)
            )

    def finish(self, run_id: str, outcome: dict) -> None:
        """Record a run's outcome: ``{"status": "done"|"failed", "metrics", "curve", "error",
        "seconds", "versions"}``."""
        status = outcome["status"]
        if status not in ("done", "failed"):
            raise ValueError(f"a finished run's status must be 'done' or 'failed'. Got {status!r}.")
        with self._transaction(f"record the outcome of run {run_id} in"):
            self._db.execute(
                "UPDATE runs SET status = ?, metrics = ?, curve = ?, error = ?, seconds = ?, "
                "versions = ?, finished_at = ? WHERE id = ?",
                (
                    status,
                    dumps(outcome.get("metrics")) if outcome.get("metrics") is not None else None,
                    dumps(outcome.get("curve")) if outcome.get("curve") is not None else None,
                    outcome.get("error"),
                    outcome.get("seconds"),
                    dumps(outcome.get("versions")) if outcome.get("versions") is not None else None,
                    time.time(),
                    run_id,
                ),
            )

    # ------------------------------------------------------------------- reading
    def records(self, status: str | Iterable[str] | None = None, *, in_spec: bool | None = True) -> list[RunRecord]:
        """Runs in spec order; ``status`` filters (one or several), ``in_spec=None`` includes
        runs that are no longer in the spec."""
        where: list[str] = []
        params: list[object] = []
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            bad = sorted(set(statuses) - set(STATUSES))
            if bad:
                raise ValueError(f"unknown run status {bad[0]!r}; choose one of: {', '.join(STATUSES)}.")
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params += statuses
        if in_spec is not None:
            where.append("in_spec = ?")
            params.append(1 if in_spec else 0)
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY position, id"
        return self._rows(sql, params)

    def record(self, run_id: str) -> RunRecord | None:
        rows = self._rows("SELECT * FROM runs WHERE id = ?", (run_id,))
        return rows[0] if rows else None

    def counts(self, *, in_spec: bool = True) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._read(
            "SELECT status, COUNT(*) FROM runs WHERE in_spec = ? GROUP BY status", (1 if in_spec else 0,)
        ).fetchall():
            out[status] = n
        return out


def _record(row: dict) -> RunRecord:
    return RunRecord(
        id=row["id"],
        position=row["position"],
        config=json.loads(row["config"]),
        dataset=row["dataset"],
        model=row["model"],
        method=row["method"],
        sparsity=row["sparsity"],
        seed=row["seed"],
        status=row["status"],
        in_spec=bool(row["in_spec"]),
        attempts=row["attempts"],
        metrics=_loads(row["metrics"]),
        curve=_loads(row["curve"]),
        error=row["error"],
        worker=row["worker"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        seconds=row["seconds"],
        versions=_loads(row["versions"]),
    )


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error): takes the write lock up front,
    so concurrent writers queue on ``busy_timeout`` instead of deadlocking.

    A failed ``COMMIT`` (SQLite keeps the transaction open after ``SQLITE_FULL``) is rolled
    back too, and a rollback that fails in turn (SQLite may have rolled back already) never
    hides the error that caused it. Write failures become :class:`StudyWriteError`."""

    def __init__(self, db: sqlite3.Connection, path: Path, what: str):
        self._db, self._path, self._what = db, path, what

    def __enter__(self):
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise self._failure(err) from err
        except sqlite3.DatabaseError as err:
            raise corrupt(self._path, err) from None
        return self._db

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return False
            except (OSError, sqlite3.Error) as err:
                exc = err
        self._rollback()
        if type(exc) is sqlite3.DatabaseError:  # SQLITE_CORRUPT / SQLITE_NOTADB: not a full disk
            raise corrupt(self._path, exc) from None
        if exc is not None and _is_write_failure(exc) and not isinstance(exc, StudyWriteError):
            raise self._failure(exc) from exc
        if exc_type is None:  # the COMMIT failed with something else
            raise exc
        return False

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _failure(self, err: BaseException) -> StudyWriteError:
        return write_failure(
            f"{self._what} the study store",
            self._path,
            err,
            "nothing was half-written: the store keeps its state before this change. "
            "Free space (or make the folder writable) and run the same command again; "
            "finished runs are kept and interrupted ones redone",
        )
