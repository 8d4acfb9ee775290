"""Reading a study's store back: tables, figures, statistics and the HTML report.

Read-only over a :class:`~prunelab.store.Store`: :mod:`~prunelab.results.records` opens a study
and reads its runs, :mod:`~prunelab.results.analysis` aggregates them (seeds, Pareto fronts,
performance profiles, paired comparisons), :mod:`~prunelab.results.tables` and
:mod:`~prunelab.results.figures` are the table and figure machinery with their registries,
:mod:`~prunelab.results.outputs` writes files safely, and :mod:`~prunelab.results.report` builds
the report. Families of figure and table kinds live one per module and are registered here, in
one place: the sweep figures (:mod:`~prunelab.results.figures`' own kinds) and study B's unit
pruning kinds (:mod:`~prunelab.results.unit_kinds`).
"""

from prunelab.results import sweep_kinds, unit_kinds  # noqa: F401  (register the families of figure and table kinds)
from prunelab.results.figures import FIGURES, write_figures
from prunelab.results.report import write_report
from prunelab.results.tables import TABLE_KINDS, build_tables, write_tables

__all__ = ["FIGURES", "TABLE_KINDS", "build_tables", "write_figures", "write_report", "write_tables"]
