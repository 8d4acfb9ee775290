"""How long a study's batchable runs take with the batched engine and one at a time, measured on a
sample of its runs, and what that means for the whole grid.

The sample is the first ``--sample`` runs of the spec's first batched group (runs that share
dataset, model, budget and regulariser: a seed × method × level block). The same runs are run
twice in this process, each time with an empty dense-model cache: once as one group
(``execute_group``, the batched engine) and once one after the other (``execute_run``, the
single-model engine). The table gives seconds per run of each engine, their ratio, and both
extrapolated to all of the study's batchable runs; the other runs (other tasks, conv nets) cost
the same with either engine and are counted but not timed.

    python benchmarks/study_engines.py experiments/study-a.yaml [--sample 16] [--quick] [--set PATH=VALUE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from prunelab.experiments import load_spec
from prunelab.experiments.runner import execute_group, execute_run
from prunelab.experiments.study import plan_jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--sample", type=int, default=16, help="runs of the first batched group to time")
    parser.add_argument("--quick", action="store_true", help="the spec's quick: variant")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args()
    study = load_spec(args.spec, overrides=args.set, quick=args.quick)
    jobs = plan_jobs(study.runs, engine="batched")
    groups = [job for job in jobs if job.group]
    if not groups:
        raise SystemExit(f"{args.spec}: no run can join a batch (see docs/engine.md for what can)")
    batchable = sum(len(job.group) for job in groups)
    configs = [member.config for member in groups[0].group][: args.sample]
    label = f"{groups[0].group[0].label} … ({len(configs)} runs)"
    timings = {}
    for engine in ("batched", "single"):
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            if engine == "batched":
                outcomes = execute_group(configs, cache)
            else:
                outcomes = [execute_run(config, cache) for config in configs]
            timings[engine] = (time.perf_counter() - start) / len(configs)
        failed = [o for o in outcomes if o["status"] != "done"]
        if failed:
            raise SystemExit(f"{engine}: {len(failed)} of the sampled runs failed: {failed[0]['error']}")
    print(f"{study.name}: {len(study.runs)} runs, {batchable} of them batchable; sample: {label}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}\n"
    )
    print("| engine | s/run (sample) | × single | batchable runs, extrapolated |")
    print("|---|---:|---:|---:|")
    for engine in ("single", "batched"):
        seconds = timings[engine]
        print(f"| {engine} | {seconds:.2f} | {timings['single'] / seconds:.1f}× | {batchable * seconds / 3600:.2f} h |")


if __name__ == "__main__":
    main()
