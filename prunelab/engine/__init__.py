"""A batched engine: many small models of one architecture trained as one computation
(work in progress for issue 6: training with fixed per-member masks; pruning schedules and
harness integration come next)."""

from prunelab.engine.batched import BatchedModels, fit_batched
from prunelab.engine.memory import available_bytes, choose_members, member_bytes

__all__ = ["BatchedModels", "available_bytes", "choose_members", "fit_batched", "member_bytes"]
