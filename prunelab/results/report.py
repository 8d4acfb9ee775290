"""A study's report: one self-contained HTML file.

Sections: the spec's ``name`` and ``description``; the runs (counts by status,
compute time, the time span, software versions); the tables of
:mod:`~prunelab.results.tables` as HTML; every figure of
:mod:`~prunelab.results.figures`, embedded as a base64 PNG; the failed runs
with their error text (collapsed); and the spec itself as YAML.

Nothing is referenced outside the file (CSS inline, images as ``data:`` URIs),
so it renders offline and can be mailed or archived as it is. A study with no
finished run yet still gets a report (its status); a figure whose data is
missing (e.g. no run recorded weight histograms) is replaced by a note.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prunelab._validation import suggest
from prunelab.results.figures import (
    DPI,
    FIGURES,
    build_figures,
    figure_declarations,
    figures_problems,
    unique_names,
)
from prunelab.results.outputs import output_folder, write_output
from prunelab.results.records import NoDataError, Study, format_level, open_study
from prunelab.results.tables import build_tables, table_problems

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1150px; margin: 2em auto; padding: 0 1.2em; line-height: 1.45; background: #fff; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.description { color: #333; } .note { color: #6b6b6b; font-style: italic; }
.error { color: #a40000; }
table { border-collapse: collapse; margin: 0.8em 0 1.4em; font-size: 0.92em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.35em; }
h3.table-title { font-size: 0.95em; margin: 1.2em 0 0.3em; }
th, td { border: 1px solid #d0d0d0; padding: 0.28em 0.65em; }
thead th { background: #f0f2f5; }
td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody th { text-align: left; font-weight: 500; background: #fafafa; }
tbody tr:nth-child(even) td { background: #fbfbfd; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f8fa; border: 1px solid #e1e4e8; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: 600; }
.run { margin: 0.6em 0 0.2em; font-weight: 600; }
"""


def write_report(store_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Write the study's HTML report; default path ``<db folder>/<db stem>_report.html``."""
    study = open_study(store_path)
    out = Path(out_path) if out_path is not None else study.path.with_name(f"{study.path.stem}_report.html")
    output_folder(out.parent)
    return write_output(out, render_report(study))


def render_report(study: Study) -> str:
    """The report of an opened study, as an HTML string."""
    spec = study.spec
    parts = [
        f"<h1>{html.escape(study.name)}</h1>",
        _description(spec.get("description")),
        "<h2>Runs</h2>",
        _runs(study),
        "<h2>Tables</h2>",
        _tables(study),
        "<h2>Figures</h2>",
        _figures(study),
        "<h2>Failed runs</h2>",
        _failed(study),
        "<h2>Spec</h2>",
        f"<pre>{html.escape(_yaml(spec))}</pre>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(study.name)} — prunelab report</title>\n<style>{CSS}</style>\n</head>\n"
        "<body>\n" + "\n".join(p for p in parts if p) + "\n</body>\n</html>\n"
    )


def _description(text: Any) -> str:
    if not text:
        return ""
    paragraphs = [p.strip() for p in str(text).split("\n\n") if p.strip()]
    return "\n".join(f'<p class="description">{html.escape(p)}</p>' for p in paragraphs)


def _runs(study: Study) -> str:
    counts = study.counts()
    total = sum(counts.values())
    status_rows = "".join(f"<tr><th>{s}</th><td>{n}</td></tr>" for s, n in counts.items())
    finished = [r for r in study.records if r.status in ("done", "failed")]
    seconds = sum(r.seconds or 0.0 for r in finished)
    starts = [r.started_at for r in study.records if r.started_at]
    ends = [r.finished_at for r in finished if r.finished_at]
    facts = [
        ("database", str(study.path)),
        ("runs in the spec", str(total)),
        ("compute time", f"{seconds:,.1f} s ({seconds / 3600:.2f} h) over {len(finished)} finished runs"),
    ]
    if starts and ends:
        facts.append(("first start → last finish", f"{_when(min(starts))} → {_when(max(ends))}"))
    facts.append(("report written", _when(_dt.datetime.now(_dt.UTC).timestamp())))
    fact_rows = "".join(
        f'<tr><th>{html.escape(k)}</th><td style="text-align:left">{html.escape(v)}</td></tr>' for k, v in facts
    )
    return (
        f'<table class="facts">\n<caption>Study</caption>\n<tbody>{fact_rows}</tbody>\n</table>\n'
        f'<table class="status">\n<caption>Runs by status</caption>\n'
        f"<thead><tr><th>status</th><th>runs</th></tr></thead>\n<tbody>{status_rows}</tbody>\n</table>\n"
        + _versions(study)
    )


def _when(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _versions(study: Study) -> str:
    """Each software version recorded by the runs, with how many runs used it."""
    seen: dict[str, Counter] = {}
    for record in study.records:
        for key, value in (record.versions or {}).items():
            seen.setdefault(str(key), Counter())[str(value)] += 1
    if not seen:
        return '<p class="note">No run recorded software versions yet.</p>'
    rows = "".join(
        f'<tr><th>{html.escape(k)}</th><td style="text-align:left">'
        + html.escape("; ".join(f"{v} ({n} run{'s' if n != 1 else ''})" for v, n in seen[k].most_common()))
        + "</td></tr>"
        for k in sorted(seen)
    )
    return (
        f'<table class="versions">\n<caption>Software versions</caption>\n'
        f"<thead><tr><th>package</th><th>version (runs)</th></tr></thead>\n<tbody>{rows}</tbody>\n</table>\n"
    )


def _no_runs_note(study: Study) -> str:
    counts = study.counts()
    return (
        f'<p class="note">No finished runs yet ({counts["pending"]} pending, {counts["running"]} running, '
        f"{counts['failed']} failed).</p>"
    )


def _tables(study: Study) -> str:
    done = study.done
    if not done:
        return _no_runs_note(study)
    tables = build_tables(study.records, study.outputs)
    if not tables:
        return '<p class="note">The spec declares no tables.</p>'
    return "\n".join(table.to_html() for table in tables)


def _figures(study: Study) -> str:
    done = study.done
    if not done:
        return _no_runs_note(study)
    parts, figures = [], []
    for i, declaration in enumerate(figure_declarations(study.spec)):
        try:
            pairs = build_figures(study.records, study.spec, declaration, i)
        except NoDataError as err:
            parts.append(f'<p class="note error">{html.escape(str(err))}</p>')
            continue
        caption = _caption(declaration)
        figures += [(name, figure, caption) for name, figure in pairs]
    names = unique_names([name for name, _, _ in figures])
    parts += [_embedded(name, figure, caption) for name, (_, figure, caption) in zip(names, figures)]
    return "\n".join(parts) or '<p class="note">The spec declares no figures.</p>'


def _caption(declaration: dict) -> str:
    """The figure kind's one-line description (its function's docstring), and the declaration."""
    doc = (FIGURES.get(declaration["kind"], param="kind").__doc__ or "").strip().splitlines()
    options = ", ".join(f"{k}: {v}" for k, v in declaration.items() if k != "kind")
    return (doc[0] if doc else "") + (f" ({options})" if options else "")


def _embedded(name: str, figure, caption: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    width, height = (round(v * DPI) for v in figure.get_size_inches())
    return (
        f'<figure id="figure-{html.escape(name)}"><img src="data:image/png;base64,{data}" '
        f'alt="{html.escape(name)}" width="{width}" height="{height}">'
        f"<figcaption><b>{html.escape(name)}</b>: {html.escape(caption)}</figcaption></figure>"
    )


def _failed(study: Study) -> str:
    failed = study.failed
    if not failed:
        return '<p class="note">No failed runs.</p>'
    items = "\n".join(
        f'<div class="run">{html.escape(r.dataset)} · {html.escape(r.model)} · {html.escape(r.method)} · '
        f"sparsity {html.escape(format_level(r.sparsity))} · seed {r.seed} "
        f'<span class="note">(run {html.escape(r.id)}, {r.attempts} attempt{"s" if r.attempts != 1 else ""})'
        f"</span></div>\n<pre>{html.escape(r.error or '(no error text recorded)')}</pre>"
        for r in failed
    )
    summary = f"{len(failed)} failed run{'s' if len(failed) != 1 else ''}"
    return f"<details>\n<summary>{summary}</summary>\n{items}\n</details>"


def _yaml(spec: dict) -> str:
    import yaml

    return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, default_flow_style=False)


def outputs_problems(outputs: Any) -> list[str]:
    """Problems of a spec's ``outputs`` section found without any run (for validating a spec
    before it runs): unknown keys, table layouts, figure kinds and their keys.
    Metric names can only be checked once runs have recorded metrics."""
    if outputs is None:
        return []
    if not isinstance(outputs, dict):
        return [f"outputs must be a mapping. Got {outputs!r} of type {type(outputs).__name__} instead."]
    problems = [
        f"outputs has an unknown key {k!r}; valid keys: figures, metric, tables."
        for k in outputs
        if k not in ("metric", "tables", "figures")
    ]
    if "metric" in outputs and not isinstance(outputs["metric"], str):
        problems.append(f"outputs.metric must be a metric name (a str). Got {outputs['metric']!r} instead.")
    tables = outputs.get("tables")
    if tables is not None and not isinstance(tables, list):
        problems.append(f"outputs.tables must be a list of table declarations. Got {tables!r} instead.")
    for i, declaration in enumerate(tables if isinstance(tables, list) else []):
        problems += table_problems(declaration, f"outputs.tables[{i}]")
    problems += figures_problems(outputs.get("figures"))
    return problems


def output_metric_problems(outputs: Any, known: Iterable[str]) -> list[str]:
    """The metric names of ``outputs`` (``metric``, each table's and figure's ``metric``) that no
    run of the study can record (``known``: the metrics its tasks declare), found before any run."""
    if not isinstance(outputs, dict):
        return []
    known = sorted(set(known))
    named = [("outputs.metric", outputs.get("metric"))]
    for key in ("tables", "figures"):
        declarations = outputs.get(key)
        named += [
            (f"outputs.{key}[{i}].metric", d.get("metric"))
            for i, d in enumerate(declarations if isinstance(declarations, list) else [])
            if isinstance(d, dict)
        ]
    return [
        f"{path}: unknown metric {metric!r}{suggest(metric, known)}; the runs of this study record: {', '.join(known)}"
        for path, metric in named
        if isinstance(metric, str) and not any(_names(metric, k) for k in known)
    ]


def _names(metric: str, declared: str) -> bool:
    """``declared`` is ``metric``, or a family such as ``latency_ms_b<B>`` (any batch size B) or
    ``accuracy_at_<K>`` (any step count K): a stem and a one-letter placeholder for an integer."""
    family = re.fullmatch(r"(.*)<[A-Z]>", declared)
    if family is None:
        return metric == declared
    stem = family.group(1)
    return metric.startswith(stem) and metric[len(stem) :].isdigit()
