"""What one run of a study does: the task kinds and what they share.

A *task* turns a spec's (dataset, model, method, training) entries into resolved run configs
and executes one config. This package holds the task base class and registry
(:mod:`~prunelab.runs.tasks`), the limits a spec's numbers must respect
(:mod:`~prunelab.runs.limits`), the preparation every task shares — datasets, training budgets,
the dense-model cache (:mod:`~prunelab.runs.prepare`) — one module per task kind (``prune``,
``unit-penalty``/``unit-iterative``, ``hashed``, ``structured``) and the batched execution of
compatible prune runs (:mod:`~prunelab.runs.batched`). It knows nothing of studies, stores or
results: it imports only the library below it.
"""

from prunelab.runs import hashed, prune, structured, units  # noqa: F401  (each registers its task kinds)
from prunelab.runs.tasks import TASKS, Checker, SpecError, Task

__all__ = ["TASKS", "Checker", "SpecError", "Task"]
