"""Executing one run: the function every executor calls, in whatever process.

``execute_run`` never raises for a failure of the run itself: an exception (a
NaN loss included) becomes a ``failed`` outcome carrying the traceback, so one bad
run never stops a sweep. It must stay a top-level function (process pools and
Ray pickle it by reference).
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback

import torch

from prunelab._version import __version__


def versions() -> dict[str, str]:
    import numpy

    return {
        "prunelab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
        "host": platform.node(),
    }


def execute_run(config: dict, cache_dir: str | None = None, threads: int | None = None) -> dict:
    """Run one resolved config; return ``{"status", "metrics", "curve", "error", "seconds",
    "versions"}``."""
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    try:
        import prunelab.experiments  # noqa: F401  (registers the built-in tasks)
        from prunelab.experiments.tasks import TASKS

        task = TASKS.get(config["task"], param="task", where="run config")()
        result = task.run(config, {"cache_dir": cache_dir})
        outcome = {"status": "done", "metrics": result["metrics"], "curve": result.get("curve")}
    except Exception as err:  # the run failed; the sweep goes on
        outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}"}
    outcome["seconds"] = time.perf_counter() - started
    outcome["versions"] = versions()
    return outcome


def init_worker(threads: int | None) -> None:
    """Set up a local worker process: torch threads, no progress bars, Ctrl-C left to the
    coordinator, and (Linux) death with the coordinator so a killed study leaves no orphans."""
    import signal

    if threads:
        torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() == 1:  # the parent died before prctl took effect
                os._exit(1)
        except OSError:
            pass


def execute_group(configs: list[dict], cache_dir: str | None = None, threads: int | None = None) -> list[dict]:
    """Run a group of batchable prune configs together with the batched engine; one outcome per
    config. If the group fails as a whole (a member's loss became NaN, ...), each run is run
    alone, so only the runs that fail alone are recorded as failed."""
    started = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    try:
        from prunelab.engine.harness import execute_prune_group

        results = execute_prune_group(configs, cache_dir)
    except Exception:  # noqa: BLE001  (each run then gets its own outcome)
        return [execute_run(config, cache_dir, threads) for config in configs]
    share = (time.perf_counter() - started) / len(configs)
    return [
        {"status": "done", "metrics": r["metrics"], "curve": r.get("curve"), "seconds": share, "versions": versions()}
        for r in results
    ]
