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


def nm_position_bits(m: int) -> int:
    """Bits per in-run position of an N:M format: ``ceil(log2 m)``."""
    return max(1, (int(m) - 1).bit_length())


def nm_bits(n_elements: int, n: int, m: int, bits: int) -> int:
    """Bits of the N:M format: ``(n_elements / m)`` runs of ``n`` values and ``n`` positions."""
    return (n_elements // m) * n * (bits + nm_position_bits(m))


@validate_params({"tensor": [TENSOR], "bits": BITS, "index_bits": INDEX_BITS_OR_AUTO, "nm": [Types(tuple), None]})
def storage_bits(
    tensor: torch.Tensor, bits: int = 32, index_bits: int | str = 4, nm: tuple[int, int] | None = None
) -> dict[str, int]:
    """Bits needed to store ``tensor`` as ``{"dense", "bitmask", "csr"}`` (and ``"nm"`` when the
    caller gives the tensor's N:M pattern ``nm=(n, m)``).

    ``dense = N·b``, ``bitmask = N + nnz·b``, ``csr = (nnz + n_fill)·(b + r)``
    with ``b = bits``, ``r = index_bits`` (``"auto"``: :func:`best_index_bits`) and
    ``n_fill`` from :func:`csr_fillers`; ``nm = (N/m)·n·(b + ceil(log2 m))``.
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
    ``"mixed"`` if they differ, ``None`` if no tensor was added.
    """

    def __init__(self, bits: int, index_bits: int | str):
        self.bits = bits
        self.index_bits = index_bits
        self.bytes = dict.fromkeys(FORMATS, 0)
        self.best = 0
        self.chosen: set[str] = set()

    def add(self, tensor: torch.Tensor, nm: tuple[int, int] | None = None) -> None:
        per_format = {
            name: bits_to_bytes(n_bits) for name, n_bits in storage_bits(tensor, self.bits, self.index_bits, nm).items()
        }
        for name, n_bytes in per_format.items():  # "nm": over the tensors that hold a pattern
            self.bytes[name] += n_bytes
        choice = best_format(per_format)
        self.best += per_format[choice]
        self.chosen.add(choice)

    def merge(self, other: StorageTally) -> None:
        for name in FORMATS:
            self.bytes[name] += other.bytes[name]
        self.best += other.best
        self.chosen |= other.chosen

    @property
    def best_format(self) -> str | None:
        if not self.chosen:
            return None
        return next(iter(self.chosen)) if len(self.chosen) == 1 else "mixed"
