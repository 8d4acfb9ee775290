"""Reading a finished (or running) study for tables, figures and reports.

Shared by :mod:`~prunelab.experiments.tables`, :mod:`~prunelab.experiments.figures`
and :mod:`~prunelab.experiments.report`: open a study database *without*
creating one, turn the stored metric JSON back into numbers, list the labels
and metric keys present, and answer a study with no finished runs with a
message that says how many are pending, running or failed.

Stored metrics are portable JSON (see :func:`prunelab.experiments.store.dumps`):
NaN was written as ``null`` and ±inf as the strings ``"inf"`` / ``"-inf"``;
:func:`number` converts them back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunelab._validation import check_choice
from prunelab.experiments.store import RunRecord, Store

#: Run labels a table or figure can be laid out by (``sparsity`` is the target level).
LABELS = ("dataset", "model", "method")
LEVEL = "sparsity"


class NoDataError(ValueError):
    """A table or figure has nothing to show (no finished runs, no run with the metric it needs)."""


@dataclass(frozen=True)
class Study:
    """A study database read once: its spec, its runs (current spec only) and their counts."""

    path: Path
    spec: dict
    records: list[RunRecord]

    @property
    def done(self) -> list[RunRecord]:
        return [r for r in self.records if r.status == "done"]

    @property
    def failed(self) -> list[RunRecord]:
        return [r for r in self.records if r.status == "failed"]

    def counts(self) -> dict[str, int]:
        out = {status: 0 for status in ("done", "failed", "running", "pending")}
        for record in self.records:
            out[record.status] = out.get(record.status, 0) + 1
        return out

    @property
    def outputs(self) -> dict:
        outputs = self.spec.get("outputs") if isinstance(self.spec, dict) else None
        if outputs is None:
            return {}
        if not isinstance(outputs, dict):
            raise TypeError(
                f"the 'outputs' section of the spec stored in {self.path} must be a mapping. "
                f"Got {outputs!r} of type {type(outputs).__name__} instead."
            )
        return outputs

    @property
    def name(self) -> str:
        name = self.spec.get("name") if isinstance(self.spec, dict) else None
        return str(name) if name else self.path.stem


def open_study(store_path: str | Path) -> Study:
    """Read a study database. Never creates one: a missing path is an error."""
    if not isinstance(store_path, (str, Path)):
        raise TypeError(
            f"a study database path must be a str or Path. Got {store_path!r} "
            f"of type {type(store_path).__name__} instead."
        )
    path = Path(store_path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "nothing"
        raise ValueError(f"no study database at {path} (found {what} there); run `prunelab run SPEC` first.")
    with Store(path, readonly=True) as store:
        spec = store.meta("spec", {}) or {}
        records = store.records()
    return Study(path=path, spec=spec if isinstance(spec, dict) else {}, records=records)


def require_done(study: Study, what: str) -> list[RunRecord]:
    """The study's finished runs, or a :class:`NoDataError` saying where the others stand."""
    done = study.done
    if not done:
        counts = study.counts()
        detail = ", ".join(f"{n} {status}" for status, n in counts.items() if status != "done")
        hint = " (see their errors with `prunelab report`)" if counts["failed"] else ""
        raise NoDataError(
            f"{what}: the study {study.path} has no finished runs yet ({detail}){hint}; "
            f"run `prunelab run SPEC` to compute them."
        )
    return done


def number(value: Any) -> float | None:
    """A stored metric as a float: ``null`` → NaN, ``"inf"``/``"-inf"`` → ±inf.

    Returns ``None`` for values that are not numbers (dicts, lists, other strings, booleans).
    """
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    return None


def metric_value(record: RunRecord, metric: str) -> float:
    """The record's metric as a float; NaN when missing or stored as ``null``."""
    metrics = record.metrics or {}
    if metric not in metrics:
        return math.nan
    value = number(metrics[metric])
    return math.nan if value is None else value


def metric_keys(records: Iterable[RunRecord]) -> list[str]:
    """Keys whose value is a number (or NaN/±inf) in at least one record, sorted."""
    keys = set()
    for record in records:
        for key, value in (record.metrics or {}).items():
            if number(value) is not None:
                keys.add(key)
    return sorted(keys)


def check_metric(records: Sequence[RunRecord], metric: Any, *, where: str) -> str:
    """``metric`` if it is a numeric metric key of at least one record (else the valid ones)."""
    keys = metric_keys(records)
    if not keys:
        raise NoDataError(f"{where}: no finished run has any numeric metric.")
    return check_choice("metric", metric, keys, where=where)


def label(record: RunRecord, name: str) -> Any:
    return getattr(record, name)


def label_values(records: Iterable[RunRecord], name: str) -> list:
    """Distinct values of a label: first-appearance (spec) order; sparsity levels ascending."""
    seen = dict.fromkeys(label(r, name) for r in records)
    return sorted(seen) if name == LEVEL else list(seen)


def format_level(sparsity: float) -> str:
    """A sparsity level as a percentage: 0.985 → ``98.5 %``."""
    return f"{100 * sparsity:.10g} %"


def format_key(name: str, value: Any) -> str:
    return format_level(value) if name == LEVEL else str(value)


def slug(text: str) -> str:
    """File-name-safe form of a title: ``mlp[hidden=100]`` → ``mlp-hidden-100``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "x"


def is_percent_metric(metric: str, values: Iterable[float]) -> bool:
    """Accuracy-like metrics (name contains ``accuracy``, or ``sparsity``) whose values lie in [0, 1]."""
    if "accuracy" not in metric and metric != "sparsity":
        return False
    return all(0.0 <= v <= 1.0 for v in values if not math.isnan(v))


def check_keys(declaration: Any, allowed: Iterable[str], *, where: str) -> list[str]:
    """Problems with a declaration's keys (it must be a mapping with known keys)."""
    if not isinstance(declaration, dict):
        return [f"{where} must be a mapping. Got {declaration!r} of type {type(declaration).__name__} instead."]
    allowed = sorted(allowed)
    return [
        f"{where} has an unknown key {key!r}; valid keys: {', '.join(allowed)}."
        for key in declaration
        if key not in allowed
    ]


def raise_problems(problems: list[str]) -> None:
    """Raise one ValueError that lists every problem found (a spec's errors all at once)."""
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def select_labels(
    records: list[RunRecord],
    declaration: dict,
    *,
    where: str,
    keys: Sequence[str] = ("methods", "models"),
    known: Sequence[RunRecord] | None = None,
) -> list[RunRecord]:
    """The records whose method / model label is listed in ``declaration["methods"]`` /
    ``declaration["models"]`` (when given). A listed label also selects its grid variants:
    ``conv`` selects ``conv[kernel=5, ...]``. A label unknown to ``known`` (default: ``records``;
    pass every run of the study, pending ones too) is an error naming the known ones; known
    labels without a run in ``records`` yet (a study still running) give a :class:`NoDataError`."""
    known = list(records) if known is None else list(known)
    for key in keys:
        wanted = declaration.get(key)
        if wanted is None:
            continue
        if isinstance(wanted, str):
            wanted = [wanted]
        if not isinstance(wanted, list):
            raise TypeError(
                f"the {key!r} parameter of {where} must be a list of {key[:-1]} labels. Got {wanted!r} instead."
            )
        name = key[:-1]
        present = [str(v) for v in label_values(known, name)]
        bases = sorted({p.split("[", 1)[0] for p in present} | set(present))
        chosen = {str(check_choice(key, str(w), bases, where=where)) for w in wanted}
        records = [
            r for r in records if str(label(r, name)) in chosen or str(label(r, name)).split("[", 1)[0] in chosen
        ]
        if not records:
            raise NoDataError(f"{where}: no finished run of {name} {', '.join(sorted(chosen))} yet.")
    return records
