"""Storage cost of a sparse tensor in three formats (docs/methods.md §7; Zhu & Gupta 2017, §5).

For a tensor with ``N`` elements of which ``nnz`` are non-zero, ``b`` bits per
stored value and ``r`` bits per relative index:

* **dense**: ``N·b`` bits, every value stored.
* **bit-mask**: ``N + nnz·b`` bits, one presence bit per element plus the
  non-zero values.
* **CSR with relative indices** (Han et al. 2016, *Deep Compression*): the
  tensor is flattened row-major; each stored entry is a value (``b`` bits) and
  the number of zeros skipped since the previous entry (``r`` bits, so
  ``0 … 2^r − 1``). A gap of ``g`` zeros longer than ``2^r − 1`` is bridged by
  ``floor(g / 2^r)`` filler entries, explicit zero values that each consume
  ``2^r`` positions (``2^r − 1`` skipped zeros plus themselves). Zeros after
  the last non-zero are not stored (the length is known) and there are no row
  pointers (positions are recovered by a cumulative sum), so
  ``(nnz + n_fill)·(b + r)`` bits.

With ``index_bits="auto"`` each tensor's CSR size is the smallest over ``r = 1 … 16``
(:func:`best_index_bits`): sparser tensors have longer gaps and want wider indices.

**Zhu & Gupta's count** (2017, §5), for comparison only: every non-zero costs its value and one
index, with no filler entries, so

* **csr_no_fill**: ``nnz·(b + r)`` bits (:func:`csr_no_fill_bits`; ``storage_bits(...,
  no_fill=True)`` adds it under that name, at the same ``r`` as ``"csr"``).

It is what CSR would take if every gap fitted the index, a lower bound on ``"csr"``:
``csr − csr_no_fill = n_fill·(b + r)`` exactly. Against the bit-mask (``N + nnz·b``) it wins when
``nnz·r < N``, i.e. above ``1 − 1/r`` sparsity (75 % for ``r = 4``, 80 % for ``r = 5``, whatever
``b``); against dense when ``nnz·(b + r) < N·b``, above ``r / (b + r)`` (11.1 % for ``b = 32, r = 4``).
No file can hold a tensor in this size when a gap exceeds ``2^r − 1`` (the positions would be
lost), so it is not one of :data:`FORMATS`: :func:`best_format` never picks it and model files
never use it.

A weight that holds an **N:M pattern** (at most N non-zeros in every run of M consecutive
inputs of a row; :func:`prunelab.pruning.granularity.nm_pattern` finds it) has a fourth format:

* **N:M**: per run, N values and N in-run positions of ``p = ceil(log2 M)`` bits each (runs with
  fewer than N non-zeros store explicit zeros), so ``(N / M)·N_el·(b + p)`` bits — the layout
  sparse tensor cores read (values plus 2-bit metadata for 2:4). It ties with the bit-mask at
  2:4 (``4 + 2b`` bits per run both) and wins below half density (1:4, 1:8, 2:8); ties go to
  N:M, after dense.

Bytes are ``ceil(bits / 8)`` per tensor.
"""

from __future__ import annotations

from numbers import Integral
from typing import cast

import torch

from prunelab._validation import TENSOR, Interval, Options, Types, check_param, validate_params

#: Format names, in the order used to break ties (simplest first; N:M, the hardware's own, before
#: the bit-mask it ties with at 2:4). ``nm`` applies only to tensors with an N:M pattern.
FORMATS = ("dense", "nm", "bitmask", "csr")


#: Zhu & Gupta's storage count, ``nnz·(b + r)`` with no filler entries: an accounting to compare
#: with, not a format (never a "best" choice, never in a model file).
NO_FILL = "csr_no_fill"


#: Widths ``index_bits="auto"`` chooses from.
INDEX_BITS = range(1, 17)


#: The declarations of bits per value and per relative index.
BITS = [Interval(Integral, 1, 64)]
INDEX_BITS_ONLY = [Interval(Integral, 1, 16)]
INDEX_BITS_OR_AUTO = [Options({"auto"}), *INDEX_BITS_ONLY]


def check_storage_bits(bits: object, index_bits: object, where: str) -> tuple[int, int | str]:
    """Validate the bits per value (``[1, 64]``) and bits per relative index (``[1, 16]`` or ``"auto"``)."""
    check_param("bits", bits, BITS, where=where)
    check_param("index_bits", index_bits, INDEX_BITS_OR_AUTO, where=where)
    # the declarations accept only an Integral, or "auto" for index_bits
    n_bits = int(cast(Integral, bits))
    return n_bits, (index_bits if index_bits == "auto" else int(cast(Integral, index_bits)))


#: Elements per slice when scanning for gaps, to bound the memory of the index tensor.
_CHUNK = 1 << 22


def _gaps(tensor: torch.Tensor):
    """The zeros before each non-zero of the row-major flattened tensor, slice by slice."""
    flat = tensor.detach().reshape(-1)
    previous = -1
    for start in range(0, flat.numel(), _CHUNK):
        idx = torch.nonzero(flat[start : start + _CHUNK]).flatten() + start
        if idx.numel() == 0:
            continue
        yield torch.diff(idx, prepend=idx.new_tensor([previous])) - 1
        previous = int(idx[-1].item())


@validate_params({"tensor": [TENSOR], "bits": BITS})
def best_index_bits(tensor: torch.Tensor, bits: int) -> int:
    """The relative-index width ``r`` in ``1 … 16`` that makes CSR smallest for ``tensor``
    (``(nnz + n_fill(r))·(bits + r)``; ties go to the narrower index)."""
    nnz = int(torch.count_nonzero(tensor).item())
    fillers = dict.fromkeys(INDEX_BITS, 0)
    for gaps in _gaps(tensor):
        shifted = gaps
        for r in INDEX_BITS:  # n_fill(r) = Σ g >> r; gaps shifted to 0 drop out
            shifted = shifted >> 1
            shifted = shifted[shifted > 0]
            if not len(shifted):
                break
            fillers[r] += int(shifted.sum().item())
    return min(INDEX_BITS, key=lambda r: ((nnz + fillers[r]) * (bits + r), r))


@validate_params({"tensor": [TENSOR], "index_bits": INDEX_BITS_ONLY})
def csr_fillers(tensor: torch.Tensor, index_bits: int) -> int:
    """Number of filler entries CSR needs: ``Σ_gaps floor(g / 2^r)``, ``r = index_bits``.

    The gaps are the zeros before each non-zero of the row-major flattened
    tensor, ``g_k = idx_k − idx_{k−1} − 1`` with ``idx_{−1} = −1``; trailing
    zeros cost nothing. Computed with ``torch.diff`` on the non-zero positions
    (slice by slice, so the index tensor stays small on huge tensors).
    """
    index_bits = int(index_bits)
    return sum(int((gaps >> index_bits).sum().item()) for gaps in _gaps(tensor))


#: Most non-zeros :func:`csr_no_fill_bits` takes (2^48, far beyond any model): a larger count is a mistake.
MAX_NNZ = 1 << 48


@validate_params({"nnz": [Interval(Integral, 0, MAX_NNZ)], "bits": BITS, "index_bits": INDEX_BITS_ONLY})
def csr_no_fill_bits(nnz: int, bits: int, index_bits: int) -> int:
    """Zhu & Gupta's count of a sparse tensor: ``nnz·(bits + index_bits)`` bits, one value and one
    relative index per non-zero and no filler entries (a lower bound on the exact CSR size, which
    adds ``csr_fillers(tensor, index_bits)·(bits + index_bits)``)."""
    return int(nnz) * (int(bits) + int(index_bits))


def nm_position_bits(m: int) -> int:
    """Bits per in-run position of an N:M format: ``ceil(log2 m)``."""
    return max(1, (int(m) - 1).bit_length())


def nm_bits(n_elements: int, n: int, m: int, bits: int) -> int:
    """Bits of the N:M format: ``(n_elements / m)`` runs of ``n`` values and ``n`` positions."""
    return (n_elements // m) * n * (bits + nm_position_bits(m))


@validate_params(
    {
        "tensor": [TENSOR],
        "bits": BITS,
        "index_bits": INDEX_BITS_OR_AUTO,
        "nm": [Types(tuple), None],
        "no_fill": [Types(bool)],
    }
)
def storage_bits(
    tensor: torch.Tensor,
    bits: int = 32,
    index_bits: int | str = 4,
    nm: tuple[int, int] | None = None,
    *,
    no_fill: bool = False,
) -> dict[str, int]:
    """Bits needed to store ``tensor`` as ``{"dense", "bitmask", "csr"}`` (and ``"nm"`` when the
    caller gives the tensor's N:M pattern ``nm=(n, m)``; and Zhu & Gupta's count
    ``"csr_no_fill"`` with ``no_fill=True``).

    ``dense = N·b``, ``bitmask = N + nnz·b``, ``csr = (nnz + n_fill)·(b + r)``
    with ``b = bits``, ``r = index_bits`` (``"auto"``: :func:`best_index_bits`) and
    ``n_fill`` from :func:`csr_fillers`; ``nm = (N/m)·n·(b + ceil(log2 m))``;
    ``csr_no_fill = nnz·(b + r)`` at the same ``r`` as ``csr`` (an accounting for comparison, not a
    format: :func:`best_format` ignores it).
    """
    bits, index_bits = check_storage_bits(bits, index_bits, "storage_bits")
    # "auto" is the only str the check lets through
    width: int = best_index_bits(tensor, bits) if isinstance(index_bits, str) else index_bits
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    nnz = int(torch.count_nonzero(flat).item())
    n_fill = csr_fillers(flat, width)
    sizes = {
        "dense": n * bits,
        "bitmask": n + nnz * bits,
        "csr": (nnz + n_fill) * (bits + width),
    }
    if nm is not None:
        sizes["nm"] = nm_bits(n, nm[0], nm[1], bits)
    if no_fill:
        sizes[NO_FILL] = csr_no_fill_bits(nnz, bits, width)
    return sizes


def bits_to_bytes(n_bits: int) -> int:
    """``ceil(n_bits / 8)``."""
    return -(-n_bits // 8)


def best_format(sizes: dict[str, int]) -> str:
    """The format with the smallest size; ties go to the simpler one (dense, N:M, bit-mask, CSR)."""
    return min((name for name in FORMATS if name in sizes), key=lambda name: (sizes[name], FORMATS.index(name)))


class StorageTally:
    """Running per-format byte totals over a set of tensors, each rounded up to whole bytes.

    ``best`` adds up each tensor's own cheapest format (a per-tensor choice);
    ``best_format`` is that format's name if every tensor chose the same one,
    ``"mixed"`` if they differ, ``None`` if no tensor was added. ``no_fill`` adds up Zhu &
    Gupta's count (``csr_no_fill``, each tensor rounded up to whole bytes), kept apart from
    ``bytes`` because it is not a format.
    """

    def __init__(self, bits: int, index_bits: int | str):
        self.bits = bits
        self.index_bits = index_bits
        self.bytes = dict.fromkeys(FORMATS, 0)
        self.best = 0
        self.no_fill = 0
        self.chosen: set[str] = set()

    def add(self, tensor: torch.Tensor, nm: tuple[int, int] | None = None) -> None:
        per_format = {
            name: bits_to_bytes(n_bits)
            for name, n_bits in storage_bits(tensor, self.bits, self.index_bits, nm, no_fill=True).items()
        }
        self.no_fill += per_format.pop(NO_FILL)
        for name, n_bytes in per_format.items():  # "nm": over the tensors that hold a pattern
            self.bytes[name] += n_bytes
        choice = best_format(per_format)
        self.best += per_format[choice]
        self.chosen.add(choice)

    def merge(self, other: StorageTally) -> None:
        for name in FORMATS:
            self.bytes[name] += other.bytes[name]
        self.best += other.best
        self.no_fill += other.no_fill
        self.chosen |= other.chosen

    @property
    def best_format(self) -> str | None:
        if not self.chosen:
            return None
        return next(iter(self.chosen)) if len(self.chosen) == 1 else "mixed"
