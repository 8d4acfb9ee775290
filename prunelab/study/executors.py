"""Executors: where runs execute. The coordinator (the ``prunelab run`` process)
owns the store; executors call back into it as runs start and finish.

* ``local`` — ``workers`` processes on this machine (in-process when 1). torch
  threads are split between workers (``cores // workers`` each). Each worker is
  its own process with its own pipe: one that dies (killed, out of memory) fails
  only the run it had started, the others' runs go on, and a fresh worker takes
  its place; a job it had not started yet goes back to the queue.
* ``ray`` — each run is a Ray task (1 CPU) on an existing Ray cluster
  (``address``: ``"auto"``, ``"HOST:PORT"``; or the Ray instance this process has
  already started). Results travel back to the coordinator, which writes them to
  the same store. prunelab must be importable on the cluster's nodes, and the
  datasets present under their ``PRUNELAB_DATA``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prunelab._validation import MAX_WORKERS, check_choice, check_number
from prunelab.study.runner import execute_group, execute_run, init_worker

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    run_id: str
    config: dict
    label: str
    group: tuple = ()  # member jobs run together by the batched engine (run_id/config unused)

    @property
    def members(self) -> tuple:
        return self.group or (self,)


OnStart = Callable[[Job, str], None]
OnFinish = Callable[[Job, dict], None]


# MAX_WORKERS, the parallel runs of one study (local worker processes or Ray tasks in flight), is
# prunelab._validation's: the command line checks it while parsing, without importing this module.


def check_executor_options(
    name: str = "local", *, workers: int | None = None, address: str | None = None
) -> tuple[str, int | None]:
    """Check an executor's name and options before anything is created; ``(name, workers)``."""
    name = check_choice("executor", name, EXECUTORS, where="prunelab run")
    if workers is not None:
        workers = int(check_number("workers", workers, where="prunelab run", low=1, high=MAX_WORKERS, integer=True))
    if name == "local" and address is not None:
        raise ValueError("the 'address' parameter of prunelab run applies to --executor ray only.")
    if address is not None and not isinstance(address, str):
        raise TypeError(
            f"the 'address' parameter of prunelab run must be a str (auto or HOST:PORT). "
            f"Got {address!r} of type {type(address).__name__} instead."
        )
    return name, workers


def make_executor(
    name: str = "local", *, workers: int | None = None, address: str | None = None, cache_dir: str | None = None
) -> Executor:
    name, workers = check_executor_options(name, workers=workers, address=address)
    if name == "local":
        return LocalExecutor(workers or 1, cache_dir)
    return RayExecutor(address, workers, cache_dir)


class Executor:
    name = ""
    parallelism = 1

    def run(self, jobs: Sequence[Job], on_start: OnStart, on_finish: OnFinish) -> None:
        raise NotImplementedError


class LocalExecutor(Executor):
    name = "local"

    def __init__(self, workers: int = 1, cache_dir: str | None = None):
        self.parallelism = workers
        self.cache_dir = cache_dir
        self.threads = max(1, (os.cpu_count() or 1) // workers)

    def run(self, jobs, on_start, on_finish):
        if self.parallelism == 1:
            for job in jobs:
                for member in job.members:
                    on_start(member, "local-0")
                work, argument = _work(job)
                for member, outcome in zip(job.members, _outcomes(job, work(argument, self.cache_dir, None))):
                    on_finish(member, outcome)
            return
        _Workers(self, on_start, on_finish).run(list(jobs))


class _Worker:
    """One local worker process and its pipe; ``job`` is what it runs now (None: idle)."""

    def __init__(self, context, slot: int, threads: int):
        self.slot = slot
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=worker_main, args=(child, threads), daemon=True, name=f"prunelab-worker-{slot}"
        )
        self.process.start()
        child.close()
        self.job: Job | None = None
        self.acknowledged = False  # the worker said it started the job

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.process.join(timeout=None if kill else 10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class _Workers:
    """``parallelism`` worker processes, each with its own pipe, so that a worker that dies
    (SIGKILL, out of memory, a crash in native code) fails only the run it had started: the
    other workers' runs go on, a job it had not yet started goes back to the queue (once), and
    a fresh worker takes its slot. Nothing queued is dropped."""

    def __init__(self, executor: LocalExecutor, on_start, on_finish):
        import multiprocessing

        self.context = multiprocessing.get_context("spawn")
        self.executor, self.on_start, self.on_finish = executor, on_start, on_finish
        self.workers: dict[int, _Worker] = {}
        self.requeued: set[int] = set()  # jobs (by id) already put back once

    def run(self, queue: list[Job]) -> None:
        from collections import deque

        waiting = deque(queue)
        try:
            while waiting or self._busy():
                self._fill(waiting)
                self._collect(waiting)
        except BaseException:
            # interrupted (Ctrl-C, SIGTERM): the coordinator re-queues the runs in flight, so stop
            # their workers now; otherwise the interpreter's exit would wait for them to finish
            for worker in self.workers.values():
                worker.stop(kill=True)
            self.workers.clear()
            raise
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()

    def _busy(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.job is not None]

    def _fill(self, queue) -> None:
        for slot in range(self.executor.parallelism):
            if not queue:
                return
            worker = self.workers.get(slot)
            if worker is not None and worker.job is not None:
                continue
            if worker is None or not worker.process.is_alive():
                if worker is not None:
                    worker.stop(kill=True)
                worker = self.workers[slot] = _Worker(self.context, slot, self.executor.threads)
            job = queue.popleft()
            for member in job.members:
                self.on_start(member, f"local-{slot}")
            work, argument = _work(job)
            worker.job, worker.acknowledged = job, False
            try:
                worker.conn.send((work.__name__, argument, self.executor.cache_dir, self.executor.threads))
            except OSError:
                pass  # it died meanwhile: _collect sees it and puts the job back

    def _collect(self, queue) -> None:
        """Wait until a busy worker sends something or dies; record what finished."""
        from multiprocessing.connection import wait

        busy = self._busy()
        waiting = {w.conn: w for w in busy} | {w.process.sentinel: w for w in busy}
        for ready in wait(list(waiting)):
            self._drain(waiting[ready])
        for worker in list(self.workers.values()):
            if worker.job is not None and not worker.process.is_alive():
                self._drain(worker)  # a result sent just before it ended counts
                if worker.job is not None:
                    self._died(worker, queue)

    def _drain(self, worker: _Worker) -> None:
        """Read the worker's pending messages: acknowledgements, and its job's outcome(s)."""
        while worker.job is not None:
            try:
                if not worker.conn.poll():
                    return
                kind, payload = worker.conn.recv()
            except Exception:  # noqa: BLE001  (the end of the pipe, or a message cut short by a death)
                return
            if kind == "started":
                worker.acknowledged = True
                continue
            job, worker.job = worker.job, None
            for member, outcome in zip(job.members, _outcomes(job, payload)):
                self.on_finish(member, outcome)

    def _died(self, worker: _Worker, queue) -> None:
        job, worker.job = worker.job, None
        worker.stop(kill=True)
        del self.workers[worker.slot]
        if job is None:  # it had nothing in flight
            return
        if not worker.acknowledged and id(job) not in self.requeued:
            self.requeued.add(id(job))
            queue.appendleft(job)  # it never started: run it on a fresh worker
            return
        for member in job.members:
            self.on_finish(member, _died())


WORKS: dict[str, Callable[..., object]] = {"execute_run": execute_run, "execute_group": execute_group}


def worker_main(conn, threads: int | None) -> None:
    """A local worker's loop: receive ``(work, argument, cache_dir, threads)``, acknowledge,
    run it, send the outcome(s); ``None`` ends it."""
    init_worker(threads)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        name, argument, cache_dir, job_threads = message
        conn.send(("started", None))
        conn.send(("done", WORKS[name](argument, cache_dir, job_threads)))


def _work(job: Job):
    """What runs a job: ``(function, its first argument)``, called with ``cache_dir, threads``."""
    if job.group:
        return execute_group, [m.config for m in job.group]
    return execute_run, job.config


def _outcomes(job: Job, result) -> list[dict]:
    return result if job.group else [result]


def _died() -> dict:
    return {
        "status": "failed",
        "seconds": None,
        "error": "WorkerDied: the worker process running this run died (killed, out of memory, "
        "or a crash in native code); the run was not completed.",
    }


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: str | None, workers: int | None, cache_dir: str | None):
        try:
            import ray
        except ImportError:
            raise ValueError(
                "the ray executor needs Ray: pip install 'prunelab[ray]' (make test installs it)."
            ) from None
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=address or "auto", ignore_reinit_error=True, log_to_driver=False)
        elif address not in (None, "auto"):
            raise ValueError(f"Ray is already initialised in this process; cannot connect to {address!r}.")
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.parallelism = workers or max(1, cpus)
        self.cache_dir = cache_dir
        self._remote = ray.remote(num_cpus=1, max_retries=0)(execute_run)
        self._remote_group = ray.remote(num_cpus=1, max_retries=0)(execute_group)

    def run(self, jobs, on_start, on_finish):
        ray = self._ray
        queue = list(jobs)
        in_flight: dict = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < self.parallelism:
                    job = queue.pop(0)
                    for member in job.members:
                        on_start(member, "ray")
                    ref = (
                        self._remote_group.remote([m.config for m in job.group], self.cache_dir, 1)
                        if job.group
                        else self._remote.remote(job.config, self.cache_dir, 1)
                    )
                    in_flight[ref] = job
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    job = in_flight.pop(ref)
                    try:
                        outcomes = _outcomes(job, ray.get(ref))
                    except Exception as err:  # the task's process died, or Ray lost it
                        outcomes = [
                            {"status": "failed", "seconds": None, "error": f"RayTaskError: {type(err).__name__}: {err}"}
                            for _ in job.members
                        ]
                    for member, outcome in zip(job.members, outcomes):
                        on_finish(member, outcome)
        finally:
            for ref in in_flight:
                ray.cancel(ref, force=True)
