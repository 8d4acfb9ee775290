"""The harness's former single package, kept so that existing imports keep working.

The harness now lives in rooms of its own (README, "Architecture"): :mod:`prunelab.study`
(specs, executors, running a study), :mod:`prunelab.runs` (what one run does),
:mod:`prunelab.store` (the SQLite store) and :mod:`prunelab.results` (tables, figures, reports).
The names below are re-exported from there; new code imports them from their rooms.
"""

from prunelab.runs import TASKS, SpecError
from prunelab.store import Store
from prunelab.study import Study, build_study, default_db_path, load_spec, run_study

__all__ = ["Store", "Study", "SpecError", "TASKS", "build_study", "default_db_path", "load_spec", "run_study"]
