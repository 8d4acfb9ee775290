"""Seconds per training epoch of a study's runs, with the batched engine (R runs at once, in the
engine's own waves) and one run at a time: what a long training budget costs per epoch.

The runs are the first ``--members`` of the spec's ``--group``-th group of runs that share
dataset, model, budget and regulariser (``group_key``: what the batched engine may train together;
``prunelab run`` trains at most 32 of them at once). They run through the study's own code (``execute_group`` or
``execute_run``, with an empty dense-model cache) for 1 dense epoch and ``--epochs`` epochs of
fine-tuning; every method's schedule is moved to prune every 10 steps, so that it fits. Each
epoch's time comes from the runs' curves (``seconds``, the time of that epoch): the median over
the fine-tuning epochs, summed over the engine's waves (members trained together share it). Data
loading, dense training, pruning and metrics are left out, so ``epochs × s/epoch`` is the cost of
a long budget. On a busy machine the wall time overstates an idle core's: the script also prints
the process's CPU time over its wall time, and the epoch time scaled by that share.

    python benchmarks/epoch_cost.py experiments/study-a-long.yaml --group 0 --members 11
    python benchmarks/epoch_cost.py experiments/study-a-long.yaml --group 0 --members 1 --engine single
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch

from prunelab.runs.batched import group_key, why_not_batched
from prunelab.study import load_spec
from prunelab.study.runner import execute_group, execute_run


def _wave(config: dict, members: int) -> int:
    """The engine's wave size on this CPU for these members (as ``fit_batched`` chooses it)."""
    from prunelab.data import dataset_info
    from prunelab.engine.memory import cache_members
    from prunelab.models import build_model

    info = dataset_info(config["dataset"]["name"])
    shape = tuple(info["input_shape"])
    model = build_model(
        config["model"]["name"], input_shape=shape, n_classes=info["n_classes"], **config["model"]["options"]
    )
    wave = cache_members(model, shape, config["training"]["batch_size"])
    waves = math.ceil(members / wave)
    return math.ceil(members / waves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--group", type=int, default=0, help="which group of runs, in spec order (from 0)")
    parser.add_argument("--members", type=int, default=8, help="runs of the group to time together")
    parser.add_argument("--engine", choices=("batched", "single"), default="batched")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs to time")
    args = parser.parse_args()
    schedule = "{name: iterative, n_prunes: 5, exponent: 3, every: 10}"
    sets = [f"methods.{i}.schedule={schedule}" for i in range(len(load_spec(args.spec).spec["methods"]))]
    sets += ["training.epochs=1", f"training.finetune_epochs={args.epochs}"]
    study = load_spec(args.spec, overrides=sets)
    groups: dict[str, list] = {}
    for run in study.runs:
        groups.setdefault(group_key(run.config), []).append(run)
    chosen = list(groups.values())[args.group][: args.members]
    configs = [run.config for run in chosen]
    if args.engine == "batched" and any(why_not_batched(c) for c in configs):
        raise SystemExit(f"these runs cannot be batched: {why_not_batched(configs[0])}; use --engine single")
    with tempfile.TemporaryDirectory() as cache:
        start, cpu = time.perf_counter(), time.process_time()
        if args.engine == "batched":
            outcomes = execute_group(configs, cache)
        else:
            outcomes = [execute_run(config, cache) for config in configs]
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    failed = [o for o in outcomes if o["status"] != "done"]
    if failed:
        raise SystemExit(f"{args.engine}: {len(failed)} runs failed: {failed[0]['error']}")
    engines = sorted({o["metrics"].get("engine", "single") for o in outcomes})
    timelines = [[c["seconds"] for c in o["curve"] if c["phase"] == "prune"] for o in outcomes]
    if args.engine == "batched":  # members trained together share their epochs: one timeline per wave
        timelines = [timelines[first] for first in range(0, len(configs), _wave(configs[0], len(configs)))]
    per_epoch = sum(statistics.median(t) for t in timelines)
    n = len(configs)
    print(
        f"{chosen[0].dataset}/{chosen[0].model}/{chosen[0].method} … ({n} runs), engine {', '.join(engines)}, {len(timelines)} wave(s)/run(s)"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}; {total:.1f} s in all, {cpu:.1f} s of CPU time (share {cpu / total:.2f})"
    )
    print(f"one fine-tuning epoch: {per_epoch:.2f} s for the {n} runs, {per_epoch / n:.3f} s per run")
    print(
        f"  × the CPU share (what an idle core would take, if the share held throughout): "
        f"{per_epoch * cpu / total / n:.3f} s per run"
    )


if __name__ == "__main__":
    main()
