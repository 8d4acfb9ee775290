"""The experiment harness: YAML study specs, a resumable SQLite store, executors,
tables, figures and reports."""

from prunelab.experiments import (
    hashed_task,  # noqa: F401  (registers 'hashed')
    prune_task,  # noqa: F401  (registers the 'prune' task)
    structured_task,  # noqa: F401  (registers 'structured')
    unit_tasks,  # noqa: F401  (registers 'unit-penalty', 'unit-iterative')
)
from prunelab.experiments.spec import Study, build_study, load_spec
from prunelab.experiments.store import Store
from prunelab.experiments.study import default_db_path, run_study
from prunelab.experiments.tasks import TASKS, SpecError

__all__ = ["Store", "Study", "SpecError", "TASKS", "build_study", "default_db_path", "load_spec", "run_study"]
