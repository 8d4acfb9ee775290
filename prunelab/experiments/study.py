"""Running a study: plan → store → executor → store, resumable.

``run_study`` takes the study's lock, records the spec, syncs the spec's runs into
the store (new runs become pending; runs a dead process left ``running`` go back
to pending; ``retry_failed`` re-queues failed ones), then hands the pending runs
to an executor and writes each outcome to the store as it arrives. Killing it at
any point loses at most the runs in flight, which the next invocation redoes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prunelab._version import __version__
from prunelab.experiments.executors import Job, make_executor
from prunelab.experiments.lock import StudyLock
from prunelab.experiments.progress import Progress
from prunelab.experiments.spec import Study
from prunelab.experiments.store import Store


@dataclass(frozen=True)
class StudyResult:
    db_path: Path
    counts: dict[str, int]
    ran: int                 # runs finished in this invocation
    seconds: float

    @property
    def complete(self) -> bool:
        return self.counts["pending"] == 0 and self.counts["running"] == 0 and self.counts["failed"] == 0


def default_db_path(study: Study, out: str | Path = "results", *, quick: bool = False) -> Path:
    """``results/<name>/study.db`` (``<name>-quick`` for --quick runs, kept apart)."""
    return Path(out) / (f"{study.name}-quick" if quick else study.name) / "study.db"


def run_study(study: Study, db_path: str | Path, *, executor: str = "local", workers: int | None = None,
              address: str | None = None, retry_failed: bool = False, progress: bool | None = None,
              cache: bool = True) -> StudyResult:
    """Run every pending run of ``study`` into the store at ``db_path``.

    ``progress``: None shows a live line on a terminal and log lines otherwise; True/False
    force the live line / the log lines. ``cache`` shares dense models between runs
    (``<db folder>/cache``). Raises StudyLocked if another process runs this study."""
    db_path = Path(db_path)
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
        display.message(f"study {study.name}: {len(study.runs)} runs ({new} new, {counts['done']} done, "
                        f"{counts['failed']} failed, {len(pending)} to run"
                        + (f", {interrupted} interrupted before" if interrupted else "")
                        + (f", {retried} failed re-queued" if retried else "")
                        + f"); {runner.name} executor x{runner.parallelism}; store {db_path}")
        jobs = [Job(r.id, r.config, f"{r.dataset}/{r.model}/{r.method} s={r.sparsity:g} #{r.seed}")
                for r in pending]
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
            for run_id in in_flight:    # interrupted: these go back to the queue
                store.mark_pending(run_id)
            display.close()
        counts = store.counts()
    return StudyResult(db_path, counts, display.finished_now, time.perf_counter() - started)
