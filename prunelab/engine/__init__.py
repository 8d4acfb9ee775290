"""A batched engine: many small models of one architecture trained as one computation
(docs/engine.md)."""

from prunelab.engine.batched import BatchedModels, fit_batched
from prunelab.engine.memory import available_bytes, cache_members, choose_members, member_bytes

__all__ = ["BatchedModels", "available_bytes", "cache_members", "choose_members", "fit_batched", "member_bytes"]
