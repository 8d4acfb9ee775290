"""Studies: a YAML spec planned into runs, executed resumably into a store.

:mod:`~prunelab.study.spec` validates a spec and expands it into runs; :mod:`~prunelab.study.run`
runs the pending ones (:func:`run_study`) through an executor (:mod:`~prunelab.study.executors`:
local processes or Ray; :mod:`~prunelab.study.runner` is what each worker calls), under a lock
(:mod:`~prunelab.study.lock`) with a progress line (:mod:`~prunelab.study.progress`). What one
run does lives in :mod:`prunelab.runs`; the store in :mod:`prunelab.store`; reading results back
in :mod:`prunelab.results` (used here only to check a spec's ``outputs`` before any run).
"""

from prunelab.study.run import default_db_path, run_study
from prunelab.study.spec import Study, build_study, load_spec

__all__ = ["Study", "build_study", "default_db_path", "load_spec", "run_study"]
