"""``prunelab run | status | table | plot | report``: studies from the command line."""

from __future__ import annotations

import argparse
import signal
import sys
from numbers import Integral
from pathlib import Path

from prunelab._validation import MAX_WORKERS, Interval, Options, cli_type

#: The executors of prunelab run (prunelab.study.executors.EXECUTORS; not imported here, so
#: that parsing the command line stays light).
EXECUTORS = ("local", "ray")


def _existing_db(path: str) -> Path:
    """The study database named on the command line (or in the named folder), checked to be a
    prunelab store without changing it (commands that read never write to it)."""
    from prunelab.store import inspect_store

    db = Path(path)
    if db.is_dir():
        db = db / "study.db"
    if not db.is_file():
        raise FileNotFoundError(
            f"no study database at {path}; run `prunelab run SPEC.yaml` first (it writes results/<name>/study.db)."
        )
    if inspect_store(db) != "study":
        raise ValueError(
            f"{db} is not a prunelab study database (an empty file); run `prunelab run SPEC.yaml` "
            f"first (it writes results/<name>/study.db)."
        )
    return db


def cmd_run(args) -> int:
    from prunelab.study import default_db_path, load_spec, run_study
    from prunelab.study.executors import check_executor_options

    check_executor_options(args.executor, workers=args.workers, address=args.address)
    study = load_spec(args.spec, overrides=args.set or [], quick=args.quick)
    db = Path(args.db) if args.db else default_db_path(study, args.out, quick=args.quick)
    if args.dry_run:
        print(f"study {study.name}: {len(study.runs)} runs, store {db}")
        for run in study.runs:
            print(f"  {run.id}  {run.dataset}/{run.model}/{run.method} sparsity={run.sparsity:g} seed={run.seed}")
        return 0
    progress = False if args.no_progress else None
    signal.signal(signal.SIGTERM, _interrupt)  # a polite kill stops like Ctrl-C: in-flight runs re-queued
    result = run_study(
        study,
        db,
        executor=args.executor,
        workers=args.workers,
        address=args.address,
        retry_failed=args.retry_failed,
        progress=progress,
        cache=not args.no_cache,
        engine=args.engine,
    )
    _write_outputs(db, print_tables=True, figures=args.report, report=args.report)
    if result.counts["failed"]:
        print(
            f"{result.counts['failed']} run(s) failed; see `prunelab status {db}`, then "
            f"`prunelab run {args.spec} --retry-failed` to run them again.",
            file=sys.stderr,
        )
        return 1
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _write_outputs(db: Path, *, print_tables: bool, figures: bool, report: bool) -> None:
    from prunelab.results.tables import build_tables, write_tables
    from prunelab.store import Store

    with Store(db, readonly=True) as store:
        if not store.counts()["done"]:
            return
        tables = build_tables(store.records(), (store.meta("spec") or {}).get("outputs"))
    paths = write_tables(db)
    if print_tables:
        for table in tables:
            print(f"\n{table.to_markdown(heading=True)}")
        print(f"\ntables: {', '.join(str(p) for p in paths)}")
    if figures:
        from prunelab.results.figures import write_figures

        print(f"figures: {', '.join(str(p) for p in write_figures(db))}")
    if report:
        from prunelab.results.report import write_report

        print(f"report: {write_report(db)}")


def cmd_status(args) -> int:
    from prunelab.store import Store

    db = _existing_db(args.study)
    with Store(db, readonly=True) as store:
        study = store.meta("study") or {}
        study = study if isinstance(study, dict) else {}
        counts = store.counts()
        stale = sum(store.counts(in_spec=False).values())
        total = sum(counts.values())
        print(
            f"study {study.get('name', '?')} ({db}): {total} runs: {counts['done']} done, "
            f"{counts['failed']} failed, {counts['running']} running, {counts['pending']} pending"
            + (f"; {stale} more from earlier versions of the spec" if stale else "")
        )
        for record in store.records(status="running"):
            print(
                f"  running  {record.id}  {record.dataset}/{record.model}/{record.method} "
                f"s={record.sparsity:g} #{record.seed}  (worker {record.worker}, attempt {record.attempts})"
            )
        for record in store.records(status="failed"):
            first = (record.error or "").splitlines()[0] if record.error else ""
            print(
                f"  failed   {record.id}  {record.dataset}/{record.model}/{record.method} "
                f"s={record.sparsity:g} #{record.seed}: {first}"
            )
            if args.verbose and record.error:
                print("    " + record.error.replace("\n", "\n    "))
        done = store.records(status="done")
        if done:
            seconds = sum(r.seconds or 0 for r in done)
            print(f"compute: {seconds:.1f} s over {len(done)} done runs")
    return 0


def cmd_table(args) -> int:
    from prunelab.results.tables import write_tables

    db = _existing_db(args.study)
    paths = write_tables(
        db, args.out, formats=tuple(args.format), columns=args.columns, rows=args.rows, metric=args.metric
    )
    for path in paths:
        if path.suffix == ".md" and not args.quiet:
            print(path.read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_plot(args) -> int:
    from prunelab.results.figures import write_figures

    db = _existing_db(args.study)
    paths = write_figures(db, args.out, formats=tuple(args.format))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def cmd_report(args) -> int:
    from prunelab.results.report import write_report

    db = _existing_db(args.study)
    print(f"wrote {write_report(db, args.out)}")
    return 0


def add_study_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run (or resume) a study from a YAML spec",
        description="Run every run of a study spec that is not done yet; results go to "
        "results/<name>/study.db. Safe to interrupt and run again.",
    )
    p.add_argument("spec", help="the study's YAML spec, e.g. experiments/quickstart.yaml")
    p.add_argument(
        "--set",
        action="append",
        metavar="PATH=VALUE",
        help="override a spec value, e.g. --set training.epochs=3 (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help="apply the spec's quick: overrides (seconds to a few minutes)")
    p.add_argument("--db", default=None, help="the study database (default: <out>/<name>/study.db)")
    p.add_argument("--out", default="results", help="folder for study databases (default: results)")
    p.add_argument(
        "--executor",
        default="local",
        type=cli_type("executor", p.prog, Options(EXECUTORS)),
        help="local (default) or ray",
    )
    p.add_argument(
        "--workers",
        type=cli_type("workers", p.prog, Interval(Integral, 1, MAX_WORKERS)),
        default=None,
        help="parallel runs (local: processes, default 1; ray: default the cluster's CPUs)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address: auto or HOST:PORT")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument(
        "--engine",
        choices=["batched", "single"],
        default="batched",
        help="batched (default): train compatible MLP runs together; single: one run at a time",
    )
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a live status line")
    p.add_argument("--no-cache", action="store_true", help="do not share dense models between runs")
    p.add_argument("--report", action="store_true", help="also write figures and the HTML report")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs; run nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="counts of done/failed/running/pending runs, and errors")
    p.add_argument("study", help="STUDY.db (or its folder)")
    p.add_argument("-v", "--verbose", action="store_true", help="print failed runs' tracebacks")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("table", help="mean ± std tables (Markdown, CSV, LaTeX)")
    p.add_argument("study", help="STUDY.db (or its folder)")
    p.add_argument("--columns", default=None, help="dataset, method, model or sparsity (default: the spec's)")
    p.add_argument("--rows", default=None, help="sparsity (default), dataset, model or method")
    p.add_argument("--metric", default=None, help="metric to tabulate (default: accuracy)")
    p.add_argument("--format", nargs="+", default=["md", "csv", "tex"], choices=["md", "csv", "tex"])
    p.add_argument(
        "--out", default=None, help="folder (default: tables/ beside study.db, <db stem>_tables/ beside another store)"
    )
    p.add_argument("--quiet", action="store_true", help="do not print the Markdown tables")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("plot", help="figures (PNG and SVG)")
    p.add_argument("study", help="STUDY.db (or its folder)")
    p.add_argument("--format", nargs="+", default=["png", "svg"], choices=["png", "svg"])
    p.add_argument(
        "--out",
        default=None,
        help="folder (default: figures/ beside study.db, <db stem>_figures/ beside another store)",
    )
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("report", help="one self-contained HTML page with tables and figures")
    p.add_argument("study", help="STUDY.db (or its folder)")
    p.add_argument("--out", default=None, help="the HTML file (default: next to the database)")
    p.set_defaults(func=cmd_report)
