"""Metrics of a pruned model (docs/methods.md §6–8): sparsity, compression, FLOPs and storage.

* :func:`summary` — per-layer and total table of everything below.
* :func:`count_flops` — dense and remaining FLOPs per sample of each module: products,
  convolutions, attention, recurrent steps, bias adds (``prunelab.metrics.flops``).
* :func:`measure_latency` — measured forward latency per batch size (``docs/latency.md``).
* :func:`storage_bits` / :func:`csr_fillers` / :func:`best_index_bits` — size of one tensor as
  dense, bit-mask and CSR; :func:`csr_no_fill_bits` — Zhu & Gupta's count, CSR without fillers.

Definitions and formulas: ``docs/metrics.md``.
"""

from prunelab.metrics.flops import FlopCount, count_flops
from prunelab.metrics.latency import Latency, measure_latency
from prunelab.metrics.storage import best_index_bits, csr_fillers, csr_no_fill_bits, storage_bits
from prunelab.metrics.summary import LayerStats, Summary, summary

__all__ = [
    "FlopCount",
    "Latency",
    "LayerStats",
    "Summary",
    "best_index_bits",
    "count_flops",
    "csr_fillers",
    "csr_no_fill_bits",
    "measure_latency",
    "storage_bits",
    "summary",
]
