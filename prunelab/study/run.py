"""Running a study: plan → store → executor → store, resumable.

``run_study`` takes the study's lock, records the spec, syncs the spec's runs into
the store (new runs become pending; runs a dead process left ``running`` go back
to pending; ``retry_failed`` re-queues failed ones), then hands the pending runs
to an executor and writes each outcome to the store as it arrives. Killing it at
any point loses at most the runs in flight, which the next invocation redoes.

A store that cannot be written is refused before any run starts (a ValueError naming the
path). A write that fails during the study (a full disk) stops it with
:class:`~prunelab.store.StudyWriteError`: that change is rolled back, the runs
in flight go back to pending (or, if even that cannot be written, are re-queued by the next
invocation), and every run finished before stays in the store.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

from prunelab._validation import MAX_WORKERS, PATH, STR, Interval, Options, Types, validate_params
from prunelab._version import __version__
from prunelab.store import Store, StudyWriteError, inspect_store
from prunelab.study.executors import EXECUTORS, Job, check_executor_options, make_executor
from prunelab.study.lock import StudyLock
from prunelab.study.progress import Progress
from prunelab.study.spec import Study


@dataclass(frozen=True)
class StudyResult:
    db_path: Path
    counts: dict[str, int]
    ran: int  # runs finished in this invocation
    seconds: float

    @property
    def complete(self) -> bool:
        return self.counts["pending"] == 0 and self.counts["running"] == 0 and self.counts["failed"] == 0


@validate_params({"study": [Types(Study)], "out": [PATH], "quick": [bool]})
def default_db_path(study: Study, out: str | Path = "results", *, quick: bool = False) -> Path:
    """``results/<name>/study.db`` (``<name>-quick`` for --quick runs, kept apart)."""
    return Path(out) / (f"{study.name}-quick" if quick else study.name) / "study.db"


ENGINES = ("batched", "single")
BATCHED_MODELS = ("mlp", "lenet-300-100")  # where batching pays on a CPU (docs/engine.md)
MAX_MEMBERS = 32


def plan_jobs(records, engine: str = "batched") -> list[Job]:
    """The jobs for pending runs: with the batched engine, batchable prune runs of MLPs that
    share a group (:func:`prunelab.runs.batched.group_key`) run together, at most as many as
    fit in memory (and :data:`MAX_MEMBERS`), and on a machine without CUDA at most one of the
    engine's cache-sized waves; every other run alone. Jobs keep the runs' order."""

    def label(r):
        return f"{r.dataset}/{r.model}/{r.method} s={r.sparsity:g} #{r.seed}"

    singles = [Job(r.id, r.config, label(r)) for r in records]
    if engine == "single":
        return singles
    from prunelab.runs.batched import group_key, why_not_batched

    groups: dict[str, list[Job]] = {}
    order: list[tuple[int, Job | str]] = []
    for index, job in enumerate(singles):
        config = job.config
        if why_not_batched(config) is None and config["model"]["name"] in BATCHED_MODELS:
            key = group_key(config)
            if key not in groups:
                groups[key] = []
                order.append((index, key))
            groups[key].append(job)
        else:
            order.append((index, job))
    jobs = []
    for _, item in sorted(order, key=lambda pair: pair[0]):
        if isinstance(item, Job):
            jobs.append(item)
            continue
        members = groups[item]
        size = _members_that_fit(members[0].config)
        for start in range(0, len(members), size):
            chunk = tuple(members[start : start + size])
            jobs.append(
                chunk[0]
                if len(chunk) == 1
                else Job(chunk[0].run_id, chunk[0].config, f"{len(chunk)} runs batched", group=chunk)
            )
    return jobs


def _members_that_fit(config: dict) -> int:
    import torch

    from prunelab.data import dataset_info
    from prunelab.engine import choose_members
    from prunelab.engine.memory import cache_members
    from prunelab.models import build_model

    info = dataset_info(config["dataset"]["name"])
    shape = tuple(info["input_shape"])
    model = build_model(
        config["model"]["name"], input_shape=shape, n_classes=info["n_classes"], **config["model"]["options"]
    )
    size = choose_members(model, shape, config["training"]["batch_size"], wanted=MAX_MEMBERS)
    if not torch.cuda.is_available():
        # a CPU trains a job's members in cache-sized waves, one wave after the other, so a job
        # of one wave is as fast per run, and a stopped study loses at most one wave's training
        size = min(size, cache_members(model, shape, config["training"]["batch_size"]))
    return size


@validate_params(
    {
        "study": [Types(Study)],
        "db_path": [PATH],
        "executor": [Options(EXECUTORS)],
        "workers": [Interval(Integral, 1, MAX_WORKERS), None],
        "address": [STR, None],
        "retry_failed": [bool],
        "progress": [bool, None],
        "cache": [bool],
        "engine": [Options(ENGINES)],
    }
)
def run_study(
    study: Study,
    db_path: str | Path,
    *,
    executor: str = "local",
    workers: int | None = None,
    address: str | None = None,
    retry_failed: bool = False,
    progress: bool | None = None,
    cache: bool = True,
    engine: str = "batched",
) -> StudyResult:
    """Run every pending run of ``study`` into the store at ``db_path``.

    ``progress``: None shows a live line on a terminal and log lines otherwise; True/False
    force the live line / the log lines. ``cache`` shares dense models between runs
    (``<db folder>/cache``). ``engine``: ``batched`` (default) trains compatible MLP runs
    together (:func:`plan_jobs`), ``single`` one run at a time. Raises StudyLocked if another
    process runs this study."""
    from prunelab._validation import check_choice

    engine = check_choice("engine", engine, ENGINES, where="prunelab run")
    check_executor_options(executor, workers=workers, address=address)
    db_path = Path(db_path)
    check_store_path(db_path)
    inspect_store(db_path)  # another file, another database, a corrupt store: refused, untouched
    started = time.perf_counter()
    cache_dir = str(db_path.parent / "cache") if cache else None
    with StudyLock(db_path), Store(db_path) as store:
        runner = make_executor(executor, workers=workers, address=address, cache_dir=cache_dir)
        store.set_meta("spec", study.spec)
        store.set_meta("study", {"name": study.name, "source": study.source, "prunelab": __version__})
        new = store.sync(study.runs)
        interrupted = store.reset_interrupted()
        retried = store.retry_failed() if retry_failed else 0
        pending = store.pending()
        counts = store.counts()
        display = Progress(len(study.runs), done=counts["done"], failed=counts["failed"], live=progress)
        display.message(
            f"study {study.name}: {len(study.runs)} runs ({new} new, {counts['done']} done, "
            f"{counts['failed']} failed, {len(pending)} to run"
            + (f", {interrupted} interrupted before" if interrupted else "")
            + (f", {retried} failed re-queued" if retried else "")
            + f"); {runner.name} executor x{runner.parallelism}; store {db_path}"
        )
        jobs = plan_jobs(pending, engine)
        in_flight: set[str] = set()

        def on_start(job: Job, worker: str) -> None:
            store.mark_running(job.run_id, worker)
            in_flight.add(job.run_id)
            display.start(job.run_id, job.label)

        def on_finish(job: Job, outcome: dict) -> None:
            store.finish(job.run_id, outcome)
            in_flight.discard(job.run_id)
            display.finish(job.run_id, job.label, outcome)

        try:
            runner.run(jobs, on_start, on_finish)
        finally:
            for run_id in in_flight:  # interrupted: these go back to the queue
                try:
                    store.mark_pending(run_id)
                except StudyWriteError:
                    pass  # still 'running': the next invocation re-queues it
            display.close()
        counts = store.counts()
    return StudyResult(db_path, counts, display.finished_now, time.perf_counter() - started)


def check_store_path(db_path: Path) -> None:
    """Refuse, before any work, a store path that cannot be created or written: a folder on
    the way that is a file, an existing folder in the store's place, a folder or file without
    write permission. Raises ValueError naming the path."""
    db_path = Path(db_path)
    advice = "choose another --out or --db"
    if db_path.is_dir():
        raise ValueError(f"cannot write the study store {db_path}: it is a folder; {advice}.")
    if db_path.exists() and not db_path.is_file():
        raise ValueError(f"cannot write the study store {db_path}: it is not a regular file; {advice}.")
    existing = db_path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write the study store {db_path}: {existing} is a file, not a folder; {advice}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the study store {db_path}: the folder {existing} is not writable; {advice}.")
    if db_path.exists() and not os.access(db_path, os.W_OK):
        raise ValueError(f"cannot write the study store {db_path}: the file is read-only; {advice}.")
