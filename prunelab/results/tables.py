"""Tables of a study: mean ± std over seeds of one metric, laid out by run labels.

A table declaration (the spec's ``outputs.tables`` entries, all keys optional)::

    rows: sparsity            # sparsity | dataset | model | method
    columns: dataset          # sparsity | dataset | model | method (not the same as rows)
    split_by: [method, model] # one table per combination of these labels
    metric: accuracy          # any numeric metric key (default: outputs.metric, else accuracy)
    percent: true             # show metric × 100 (default: accuracy-like metrics in [0, 1])
    digits: 2                 # decimals shown (default 2 for percentages, else 4 significant digits)
    title: "Test accuracy"    # replaces the metric name in the title
    methods: [MagL1, MagL2]   # only these methods / models (a label also selects its grid
    models: [conv]            # variants: conv is every conv[kernel=..., ...])

``split_by`` defaults to the labels among dataset/model/method/sparsity that are
neither rows nor columns, leaving out a label that varies but is fixed by the
row and column (e.g. models each pruned to their own level, with rows = model).
Cells never pool different datasets, models, methods or levels: a label that
varies within one (rows, columns, split_by) cell is an error that says to add
it to ``split_by``.

Each cell is ``mean ± std`` of :func:`~prunelab.results.analysis.aggregate`
(sample std; ``–`` when one seed), followed by ``(n=k)`` when it has fewer
values than the fullest cell of its table; cells without a run are empty.
Markdown, CSV (raw values, full precision: ``<column> mean``, ``<column> std``,
``<column> n``), LaTeX (booktabs) and HTML renderings.

A declaration with a ``kind`` key is built by that registered table kind
instead (:data:`TABLE_KINDS`; study B's ``penalties`` and ``iterative``, see
:mod:`~prunelab.results.unit_kinds`); each kind checks its own keys.
"""

from __future__ import annotations

import csv
import html
import io
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab._validation import check_choice, check_number
from prunelab.registry import Registry
from prunelab.results.analysis import Group, aggregate
from prunelab.results.outputs import default_output_folder, output_folder, write_output
from prunelab.results.records import (
    LABELS,
    LEVEL,
    NoDataError,
    check_keys,
    check_metric,
    format_key,
    is_percent_metric,
    label_values,
    metric_value,
    open_study,
    raise_problems,
    require_done,
    select_labels,
    slug,
)
from prunelab.store import RunRecord

ROW_CHOICES = (*LABELS, LEVEL)
COLUMN_CHOICES = ROW_CHOICES
SPLIT_CHOICES = ROW_CHOICES
TABLE_KEYS = ("rows", "columns", "split_by", "metric", "percent", "digits", "title", "methods", "models")
FORMATS = ("md", "csv", "tex")
DEFAULT_TABLE = {"rows": "sparsity", "columns": "method"}

#: A table kind builds ``(finished runs, declaration, outputs section, where) -> [Table, ...]``.
TableFunction = Callable[[list[RunRecord], dict, dict, str], list["Table"]]
TABLE_KINDS: Registry[TableFunction] = Registry("table kind")
#: Each kind's check of a declaration without the runs: ``(declaration, where) -> [problem, ...]``.
TABLE_KIND_CHECKS: dict[str, Callable[[dict, str], list[str]]] = {}


def table_kind(name: str, check: Callable[[dict, str], list[str]]) -> Callable[[TableFunction], TableFunction]:
    """Register a table kind (a declaration ``{kind: name, ...}``) with its run-free check."""

    def register(function: TableFunction) -> TableFunction:
        TABLE_KIND_CHECKS[name] = check
        return TABLE_KINDS.register(name)(function)

    return register


def digits_and_title(declaration: dict, where: str) -> tuple[int | None, str | None]:
    """A table declaration's ``digits`` (decimals, 0–10) and ``title`` (a str), both optional."""
    digits = declaration.get("digits")
    if digits is not None:
        digits = int(check_number("digits", digits, where=where, low=0, high=10, integer=True))
    title = declaration.get("title")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"the 'title' parameter of {where} must be a str. Got {title!r} instead.")
    return digits, title


def _has_kind(declaration: Any) -> bool:
    return isinstance(declaration, dict) and "kind" in declaration


def _kind_problems(declaration: dict, where: str) -> list[str]:
    try:
        kind = TABLE_KINDS.canonical(declaration["kind"], param="kind", where=where)
    except (ValueError, TypeError) as err:
        return [str(err)]
    return TABLE_KIND_CHECKS[kind](declaration, where)


@dataclass(frozen=True)
class Cell:
    """A table cell: a :class:`Group`'s statistics and how to print them."""

    mean: float | None
    std: float | None
    n: int
    scale: float = 1.0  # 100 for percentages
    digits: int | None = None  # decimals; None: 4 significant digits of the mean
    full_n: int = 0  # the fullest cell's n in the table; fewer values are flagged

    @property
    def text(self) -> str:
        """``mean ± std`` (std ``–`` for a single value), ``(n=k)`` when short of ``full_n``."""
        if self.mean is None:
            return "n/a"
        decimals = self.digits if self.digits is not None else _decimals(self.mean * self.scale)
        mean = _fixed(self.mean * self.scale, decimals)
        std = "–" if self.std is None else _fixed(self.std * self.scale, decimals)
        short = f" (n={self.n})" if self.n < self.full_n else ""
        return f"{mean} ± {std}{short}"


def _decimals(value: float) -> int:
    if not math.isfinite(value) or value == 0:
        return 4
    return int(min(6, max(0, 3 - math.floor(math.log10(abs(value))))))


def _fixed(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}" if math.isfinite(value) else str(value)


@dataclass(frozen=True)
class Table:
    """One rendered table: ``rows`` are ``(row_key, [Cell | None per column])``."""

    title: str
    name: str  # file stem
    row_label: str  # "sparsity", "dataset", ...
    column_labels: list[str]
    rows: list[tuple[Any, list[Cell | None]]]

    def row_text(self, key: Any) -> str:
        return format_key(self.row_label, key)

    def _text_rows(self) -> list[list[str]]:
        return [[self.row_text(key), *("" if c is None else c.text for c in cells)] for key, cells in self.rows]

    def to_markdown(self, *, heading: bool = False) -> str:
        """A pipe table (header, rule, one line per row); ``heading=True`` puts ``### title`` above it."""

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [f"### {self.title}", ""] if heading else []
        lines += [line([self.row_label, *self.column_labels]), "|" + "---|" + "---:|" * len(self.column_labels)]
        lines += [line(row) for row in self._text_rows()]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """Raw values (not ×100), full precision: row key, then mean, std, n per column."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            [
                self.row_label,
                *itertools.chain.from_iterable((f"{c} mean", f"{c} std", f"{c} n") for c in self.column_labels),
            ]
        )
        for key, cells in self.rows:
            out = [repr(key) if isinstance(key, float) else key]
            for cell in cells:
                if cell is None:
                    out += ["", "", ""]
                else:
                    out += [_raw(cell.mean), _raw(cell.std), cell.n]
            writer.writerow(out)
        return buffer.getvalue()

    def to_latex(self) -> str:
        """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
        lines = [
            r"\begin{table}[ht]",
            r"\centering",
            rf"\caption{{{latex_escape(self.title)}}}",
            rf"\label{{tab:{self.name}}}",
            rf"\begin{{tabular}}{{l{'r' * len(self.column_labels)}}}",
            r"\toprule",
            " & ".join(latex_escape(c) for c in [self.row_label, *self.column_labels]) + r" \\",
            r"\midrule",
        ]
        lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in self._text_rows()]
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in [self.row_label, *self.column_labels])
        body = "".join(
            "<tr>"
            + f"<th>{html.escape(row[0])}</th>"
            + "".join(f"<td>{html.escape(c)}</td>" for c in row[1:])
            + "</tr>\n"
            for row in self._text_rows()
        )
        return (
            f'<h3 class="table-title">{html.escape(self.title)}</h3>\n<table class="results">\n'
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"
        )


def _raw(value: float | None) -> str:
    return "" if value is None else repr(float(value))


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters; ``±`` → ``$\\pm$``, ``–`` → ``--``, ``—`` → ``---``."""
    out = "".join(_LATEX.get(ch, ch) for ch in str(text))
    return out.replace("±", r"$\pm$").replace("–", "--").replace("—", "---")


# ----------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class _Layout:
    rows: str
    columns: str
    split_by: tuple[str, ...] | None  # None: the default, which depends on the runs
    metric: str
    percent: bool | None
    digits: int | None
    title: str | None


def _declarations(outputs: Any) -> tuple[str | None, list[Any]]:
    if outputs is None:
        outputs = {}
    if not isinstance(outputs, dict):
        raise TypeError(
            f"the 'outputs' parameter of build_tables must be a mapping (the spec's outputs "
            f"section) or None. Got {outputs!r} of type {type(outputs).__name__} instead."
        )
    tables = outputs.get("tables")
    if tables is None:
        tables = [DEFAULT_TABLE]
    if not isinstance(tables, list):
        raise TypeError(
            f"outputs.tables must be a list of table declarations. Got {tables!r} "
            f"of type {type(tables).__name__} instead."
        )
    return outputs.get("metric"), tables


def table_problems(declaration: Any, where: str) -> list[str]:
    """Problems of one declaration that can be found without the runs (for spec validation)."""
    if _has_kind(declaration):
        return _kind_problems(declaration, where)
    problems = check_keys(declaration, TABLE_KEYS, where=where)
    if problems and not isinstance(declaration, dict):
        return problems
    try:
        _layout_without_runs(declaration, where, metric="accuracy")
    except (ValueError, TypeError) as err:
        problems.append(str(err))
    return problems


def _layout_without_runs(declaration: dict, where: str, metric: str) -> _Layout:
    rows = check_choice("rows", declaration.get("rows", "sparsity"), ROW_CHOICES, where=where)
    default_columns = "dataset" if rows == "method" else "method"
    columns = check_choice("columns", declaration.get("columns", default_columns), COLUMN_CHOICES, where=where)
    if rows == columns:
        raise ValueError(f"the 'rows' and 'columns' parameters of {where} must differ. Got {rows!r} for both.")
    split = declaration.get("split_by")
    if isinstance(split, str):
        split = [split]
    if split is not None and not isinstance(split, list):
        raise TypeError(
            f"the 'split_by' parameter of {where} must be a list of labels among: "
            f"{', '.join(sorted(SPLIT_CHOICES))}. Got {split!r} instead."
        )
    for key in split or []:
        check_choice("split_by", key, [k for k in SPLIT_CHOICES if k not in (rows, columns)], where=where)
    if split is not None and len(set(split)) != len(split):
        raise ValueError(f"the 'split_by' parameter of {where} names a label twice. Got {split!r} instead.")
    percent = declaration.get("percent")
    if percent is not None and not isinstance(percent, bool):
        raise TypeError(f"the 'percent' parameter of {where} must be true or false. Got {percent!r} instead.")
    digits, title = digits_and_title(declaration, where)
    metric = declaration.get("metric", metric)
    if not isinstance(metric, str):
        raise TypeError(
            f"the 'metric' parameter of {where} must be a metric name (a str). "
            f"Got {metric!r} of type {type(metric).__name__} instead."
        )
    return _Layout(rows, columns, None if split is None else tuple(split), metric, percent, digits, title)


def _layout(declaration: Any, where: str, default_metric: str, done: list[RunRecord]) -> _Layout:
    problems = check_keys(declaration, TABLE_KEYS, where=where)
    if problems:
        raise_problems(problems)
    layout = _layout_without_runs(declaration, where, default_metric)
    check_metric(done, layout.metric, where=where)
    free = [k for k in SPLIT_CHOICES if k not in (layout.rows, layout.columns)]
    if layout.split_by is None:
        # Split by every other label, except one that varies but is fixed by the row and column
        # (e.g. each model pruned to its own level): splitting by it would only scatter the rows.
        split = tuple(
            k for k in free if len(label_values(done, k)) == 1 or _varies_within(done, k, (layout.rows, layout.columns))
        )
        return _Layout(layout.rows, layout.columns, split, layout.metric, layout.percent, layout.digits, layout.title)
    laid_out = (layout.rows, layout.columns, *layout.split_by)
    for key in free:
        if key not in layout.split_by and _varies_within(done, key, laid_out):
            values = label_values(done, key)
            shown = ", ".join(format_key(key, v) for v in values)
            raise ValueError(
                f"{where}: the label {key!r} takes {len(values)} values ({shown}) within one "
                f"cell of rows {layout.rows!r} × columns {layout.columns!r}"
                + (f" × split_by {list(layout.split_by)}" if layout.split_by else "")
                + "; cells never pool them: add it to split_by."
            )
    return layout


def _varies_within(done: list[RunRecord], key: str, cell: Sequence[str]) -> bool:
    """Whether ``key`` takes several values among the runs of one (``cell`` labels) combination."""
    seen: dict[tuple, Any] = {}
    for record in done:
        at = tuple(getattr(record, k) for k in cell)
        value = getattr(record, key)
        if seen.setdefault(at, value) != value:
            return True
    return False


# ----------------------------------------------------------------------------------- building
def build_tables(records: Sequence[RunRecord], outputs: dict | None = None) -> list[Table]:
    """The tables that ``outputs`` (the spec's ``outputs`` section) declares, from finished runs.

    Without ``outputs.tables``: one declaration ``{rows: sparsity, columns: method}``.
    Every declaration is checked first; all problems are reported together. A declaration
    with a ``kind`` is built by that :data:`TABLE_KINDS` entry.
    """
    records = list(records)
    done = [r for r in records if isinstance(r, RunRecord) and r.status == "done"]
    if not done:
        raise ValueError(f"build_tables: none of the {len(records)} records given is a finished run.")
    default_metric, declarations = _declarations(outputs)
    layouts: list[tuple[_Layout | dict, Any]] = []
    problems: list[str] = []
    for i, declaration in enumerate(declarations):
        where = f"outputs.tables[{i}]"
        if _has_kind(declaration):
            problems += _kind_problems(declaration, where)
            layouts.append((declaration, where))
            continue
        try:
            chosen = (
                select_labels(done, declaration, where=where, known=records) if isinstance(declaration, dict) else done
            )
            layouts.append((_layout(declaration, where, default_metric or "accuracy", chosen), chosen))
        except NoDataError:
            continue  # its methods / models have no finished run yet
        except (ValueError, TypeError) as err:
            problems.append(str(err))
    raise_problems(problems)
    tables: list[Table] = []
    names: set[str] = set()
    for first, second in layouts:
        built = (
            _tables_of(first, second)
            if isinstance(first, _Layout)
            else TABLE_KINDS.get(first["kind"])(done, first, outputs or {}, second)
        )
        for table in built:
            name, k = table.name, 2
            while name in names:
                name, k = f"{table.name}-{k}", k + 1
            names.add(name)
            tables.append(Table(table.title, name, table.row_label, table.column_labels, table.rows))
    return tables


def _tables_of(layout: _Layout, done: list[RunRecord]) -> list[Table]:
    split_by = layout.split_by
    assert split_by is not None  # _layout has resolved the default
    groups = aggregate(done, layout.metric)
    percent = layout.percent
    if percent is None:
        percent = is_percent_metric(layout.metric, [metric_value(r, layout.metric) for r in done])
    scale = 100.0 if percent else 1.0
    heading = (layout.title or layout.metric) + (" (%)" if percent else "")
    split_values = [label_values(done, key) for key in split_by]
    tables = []
    for combo in itertools.product(*split_values):
        subset = [g for g in groups if all(_group_label(g, k) == v for k, v in zip(split_by, combo))]
        if not subset:
            continue
        row_keys = _ordered(subset, layout.rows, done)
        column_keys = _ordered(subset, layout.columns, done)
        by_cell = {(_group_label(g, layout.rows), _group_label(g, layout.columns)): g for g in subset}
        full_n = max(g.n for g in subset)
        rows = [
            (key, [_cell(by_cell.get((key, column)), scale, layout.digits, full_n) for column in column_keys])
            for key in row_keys
        ]
        where = ", ".join(f"{k} = {format_key(k, v)}" for k, v in zip(split_by, combo))
        title = f"{heading}, mean ± std over seeds" + (f" — {where}" if where else "")
        name = slug(
            "_".join(
                [
                    layout.metric,
                    f"{layout.rows}-by-{layout.columns}",
                    *(format_key(k, v) for k, v in zip(split_by, combo)),
                ]
            )
        )
        tables.append(Table(title, name, layout.rows, [format_key(layout.columns, c) for c in column_keys], rows))
    return tables


def _group_label(group: Group, key: str) -> Any:
    return getattr(group, key)


def _ordered(subset: list[Group], key: str, done: list[RunRecord]) -> list:
    present = {_group_label(g, key) for g in subset}
    return [v for v in label_values(done, key) if v in present]


def _cell(group: Group | None, scale: float, digits: int | None, full_n: int) -> Cell | None:
    if group is None:
        return None
    return Cell(group.mean, group.std, group.n, scale=scale, digits=digits, full_n=full_n)


# ------------------------------------------------------------------------------------ writing
def write_tables(
    store_path: str | Path,
    out_dir: str | Path | None = None,
    formats: Sequence[str] = FORMATS,
    *,
    columns: str | None = None,
    rows: str | None = None,
    metric: str | None = None,
) -> list[Path]:
    """Write a study's tables; returns the paths written (prints nothing).

    ``formats``: ``md`` → one ``tables.md`` with every table under a heading;
    ``csv`` and ``tex`` → one ``<table name>.csv`` / ``.tex`` per table. ``out_dir``
    defaults to :func:`~prunelab.results.outputs.default_output_folder` (``tables/`` beside
    ``study.db``, ``<db stem>_tables/`` beside another store). ``columns`` / ``rows`` (the CLI's
    ``--columns`` / ``--rows``) replace the spec's declarations by one table layout;
    ``metric`` (``--metric``) replaces every declaration's metric.
    """
    if isinstance(formats, str):
        formats = [formats]
    formats = [check_choice("format", f, FORMATS, where="table") for f in formats]
    if columns is not None:
        check_choice("columns", columns, COLUMN_CHOICES, where="table")
    if rows is not None:
        check_choice("rows", rows, ROW_CHOICES, where="table")
    study = open_study(store_path)
    done = require_done(study, "prunelab table")
    if metric is not None:
        check_metric(done, metric, where="table")
    tables = build_tables(study.records, _overridden(study.outputs, columns=columns, rows=rows, metric=metric))
    out = output_folder(Path(out_dir) if out_dir is not None else default_output_folder(study.path, "tables"))
    paths = []
    if "md" in formats:
        paths.append(
            write_output(
                out / "tables.md", f"# {study.name}\n\n" + "\n".join(t.to_markdown(heading=True) for t in tables)
            )
        )
    for ext, render in (("csv", Table.to_csv), ("tex", Table.to_latex)):
        if ext in formats:
            for table in tables:
                paths.append(write_output(out / f"{table.name}.{ext}", render(table)))
    return paths


def _overridden(outputs: dict, *, columns: str | None, rows: str | None, metric: str | None) -> dict:
    """The spec's outputs with the command line's choices applied."""
    outputs = dict(outputs)
    if columns is not None or rows is not None:
        rows = rows or "sparsity"
        columns = columns or ("dataset" if rows == "method" else "method")
        if rows == columns:
            raise ValueError(f"the 'rows' and 'columns' parameters of table must differ. Got {rows!r} for both.")
        outputs["tables"] = [{"rows": rows, "columns": columns}]
    if metric is not None:
        outputs["metric"] = metric
        declarations = outputs.get("tables") or [DEFAULT_TABLE]
        outputs["tables"] = [
            {k: v for k, v in d.items() if k not in ("metric", "percent", "digits")} if isinstance(d, dict) else d
            for d in declarations
        ]
    return outputs
