"""Executors: where runs execute. The coordinator (the ``prunelab run`` process)
owns the store; executors call back into it as runs start and finish.

* ``local`` — ``workers`` processes on this machine (in-process when 1). torch
  threads are split between workers (``cores // workers`` each). A worker that
  dies (killed, out of memory) fails only its own run; the pool is restarted.
* ``ray`` — each run is a Ray task (1 CPU) on an existing Ray cluster
  (``address``: ``"auto"``, ``"HOST:PORT"``; or the Ray instance this process has
  already started). Results travel back to the coordinator, which writes them to
  the same store. prunelab must be importable on the cluster's nodes, and the
  datasets present under their ``PRUNELAB_DATA``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from prunelab._validation import check_choice, check_number
from prunelab.experiments.runner import execute_group, execute_run, init_worker

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Job:
    run_id: str
    config: dict
    label: str
    group: tuple = ()          # member jobs run together by the batched engine (run_id/config unused)

    @property
    def members(self) -> tuple:
        return self.group or (self,)


OnStart = Callable[[Job, str], None]
OnFinish = Callable[[Job, dict], None]


def make_executor(name: str = "local", *, workers: int | None = None, address: str | None = None,
                  cache_dir: str | None = None) -> "Executor":
    name = check_choice("executor", name, EXECUTORS, where="prunelab run")
    if workers is not None:
        workers = check_number("workers", workers, where="prunelab run", low=1, integer=True)
    if name == "local":
        if address is not None:
            raise ValueError("the 'address' parameter of prunelab run applies to --executor ray only.")
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
        queue = list(jobs)
        while queue:
            queue = self._run_pool(queue, on_start, on_finish)

    def _run_pool(self, queue: list[Job], on_start, on_finish) -> list[Job]:
        """Run jobs until done or the pool breaks; return the jobs not yet started."""
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(self.parallelism, mp_context=context, initializer=init_worker,
                                   initargs=(self.threads,))
        in_flight: dict = {}
        slot = 0
        try:
            while queue or in_flight:
                while queue and len(in_flight) < self.parallelism:
                    job = queue.pop(0)
                    for member in job.members:
                        on_start(member, f"local-{slot % self.parallelism}")
                    slot += 1
                    in_flight[pool.submit(*_work(job), self.cache_dir, self.threads)] = job
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    job = in_flight.pop(future)
                    try:
                        outcomes = _outcomes(job, future.result())
                    except BrokenProcessPool:
                        outcomes = [_died() for _ in job.members]
                    for member, outcome in zip(job.members, outcomes):
                        on_finish(member, outcome)
        except BrokenProcessPool:
            for job in in_flight.values():
                for member in job.members:
                    on_finish(member, _died())
            return queue
        except BaseException:
            # interrupted (Ctrl-C, SIGTERM): the coordinator re-queues the runs in flight, so stop
            # their workers now; otherwise the interpreter's exit would wait for them to finish
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return []


def _work(job: Job):
    """What runs a job: ``(function, its first argument)``, called with ``cache_dir, threads``."""
    if job.group:
        return execute_group, [m.config for m in job.group]
    return execute_run, job.config


def _outcomes(job: Job, result) -> list[dict]:
    return result if job.group else [result]


def _died() -> dict:
    return {"status": "failed", "seconds": None,
            "error": "WorkerDied: the worker process running this run died (killed, out of memory, "
                     "or a crash in native code); the run was not completed."}


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: str | None, workers: int | None, cache_dir: str | None):
        try:
            import ray
        except ImportError:
            raise ValueError("the ray executor needs Ray: pip install 'prunelab[ray]' "
                             "(make test installs it).") from None
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
                    ref = (self._remote_group.remote([m.config for m in job.group], self.cache_dir, 1) if job.group
                           else self._remote.remote(job.config, self.cache_dir, 1))
                    in_flight[ref] = job
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    job = in_flight.pop(ref)
                    try:
                        outcomes = _outcomes(job, ray.get(ref))
                    except Exception as err:  # the task's process died, or Ray lost it
                        outcomes = [{"status": "failed", "seconds": None,
                                     "error": f"RayTaskError: {type(err).__name__}: {err}"} for _ in job.members]
                    for member, outcome in zip(job.members, outcomes):
                        on_finish(member, outcome)
        finally:
            for ref in in_flight:
                ray.cancel(ref, force=True)
