"""Compressed model files: write a pruned, thinned or hashed model small, read it back safely.

A prunelab model file holds plain bytes and JSON, never pickled code::

    b"PRUNELAB"  u8 version  u32 header length  header (UTF-8 JSON)  payload

The header names the architecture (the registry name and arguments, ``model.config``;
tensor shapes differing from the registry model's are the thinned shapes) and, per
state-dict tensor, its shape, encoding, value type and byte range in the payload. A
SHA-256 over the header and the payload detects tampering and truncation.

Each floating tensor is stored in one of the three formats of docs/methods.md §7 (the byte
counts are those of :mod:`prunelab.metrics.storage`, so the payload equals the summary's
storage prediction):

* ``dense``: every value;
* ``bitmask``: one presence bit per element (packed, little-endian bit order), then the
  non-zero values in row-major order;
* ``csr``: per stored entry a value and an ``r``-bit count of the zeros skipped before it
  (relative index, Han et al. 2016); gaps longer than ``2^r − 1`` are bridged by
  explicit-zero filler entries. Values first, then the packed counts. By default each
  tensor gets the width ``r`` in 1 … 16 that makes it smallest.
* ``nm``: a weight with an N:M pattern (:func:`prunelab.pruning.granularity.nm_pattern`: at
  most N non-zeros in every run of M consecutive inputs of a row, runs in the order of
  :func:`~prunelab.pruning.granularity.nm_view`): per run, N values (its non-zeros in run order,
  explicit zeros if it has fewer), then all in-run positions as packed ``ceil(log2 M)``-bit
  integers. The header records ``n``, ``m`` and the ``layout`` the runs follow.

``encoding="auto"`` picks each tensor's smallest format; ``encoding="nm"`` stores every weight with
an N:M pattern as ``nm`` and the others as ``auto`` would. ``values`` stores the weights of
Linear / Conv / HashedNets layers (the tensors pruning acts on) as ``float32`` (exact),
``float16`` or ``int8`` with one float32 scale per output channel (``scale = max|w| / 127``
per row); biases, normalisation parameters and buffers always stay exact. A non-zero weight
never rounds to zero, so the sparsity pattern survives reduced precision.

:func:`load` also reads what :func:`prunelab.hf.save_pretrained` writes — a directory
(:func:`load_directory`) or a model file whose metadata names a Hugging Face class and config —
through :mod:`prunelab.hf_load`; :mod:`prunelab.hf`, which writes them, imports this module, never
the other way round.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
import threading
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import TypeGuard, cast

import numpy as np
import torch
from torch import nn

from prunelab._files import ModelFileError, atomic_write_bytes
from prunelab._model_checks import check_materialised
from prunelab._validation import MAPPING, MODEL, PATH, STR, Constraint, Interval, check_type, suggest, validate_params
from prunelab.hf_load import CONFIG_NAME, PLM_NAME, build_from_metadata, load_stock
from prunelab.metrics.dry_run import SHAPE
from prunelab.metrics.storage import (
    INDEX_BITS_OR_AUTO,
    best_format,
    best_index_bits,
    bits_to_bytes,
    check_storage_bits,
    nm_position_bits,
    storage_bits,
)
from prunelab.pruning.granularity import NM_LAYOUTS, nm_pattern, nm_unview, nm_view

MAGIC = b"PRUNELAB"
VERSION = 1
#: Bytes before the header: magic, version, header length.
PREAMBLE = len(MAGIC) + 1 + 4
ENCODINGS = ("auto", "dense", "bitmask", "csr", "nm")
#: The largest M a file's N:M entry may declare (positions of at most 16 bits).
MAX_NM_M = 1 << 16
VALUES = ("float32", "float16", "int8")
_VALUE_BITS = {"float32": 32, "float16": 16, "int8": 8}
#: Plain dtypes a tensor may be stored in exactly (integer buffers, e.g. BatchNorm's step count).
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")

# Limits on what a model file may declare (docs/export.md, "Limits"); each is checked against the
# header before anything the file describes is allocated or built.
#: Most bytes of JSON header a file may declare.
MAX_HEADER_BYTES = 64 << 20
#: Most dimensions a stored tensor may have.
MAX_DIMS = 16
#: Most elements one stored tensor may declare (sizes beyond this are a damaged or crafted file).
MAX_ELEMENTS = 1 << 40
#: CSR relative indices are 1 ... MAX_INDEX_BITS bits wide (what save writes).
MAX_INDEX_BITS = 16
#: A model built from the file's own architecture (a registry config or Hugging Face metadata) may
#: take at most ``FREE_BYTES + MAX_EXPANSION × payload bytes`` of memory (parameters, buffers and a
#: dry-run input): 4096 bytes (1024 float32 weights) per payload byte holds every pruned model up to
#: 99.9 % sparsity or more; a larger model from a tiny file is refused (pass ``load(path, model=...)``
#: to load it into a model you built).
MAX_EXPANSION = 4096
FREE_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorEntry:
    """How one tensor was stored: ``bytes`` of payload, of which ``scale_bytes`` are int8 scales."""

    name: str
    shape: tuple[int, ...]
    nonzero: int
    encoding: str
    values: str
    bytes: int
    scale_bytes: int = 0


@dataclass(frozen=True)
class ExportReport:
    """What :func:`save` wrote. ``predicted_bytes`` is the payload the storage formulas give."""

    path: Path
    file_bytes: int
    header_bytes: int
    payload_bytes: int
    predicted_bytes: int
    tensors: list[TensorEntry] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{'tensor':<28} {'shape':<18} {'non-zero':>9} {'encoding':<8} {'values':<8} {'bytes':>10}"]
        for t in self.tensors:
            shape = "x".join(map(str, t.shape)) or "scalar"
            lines.append(f"{t.name:<28} {shape:<18} {t.nonzero:>9,} {t.encoding:<8} {t.values:<8} {t.bytes:>10,}")
        lines.append(
            f"{self.path}: {self.file_bytes:,} bytes = {self.payload_bytes:,} payload "
            f"(predicted {self.predicted_bytes:,}) + {self.header_bytes + PREAMBLE:,} header"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- bit packing


def _pack(counts: np.ndarray, bits: int) -> bytes:
    """``bits``-bit unsigned integers packed back to back, little-endian bit order."""
    shifts = np.arange(bits, dtype=np.uint32)
    planes = ((counts.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _unpack(data: bytes, n: int, bits: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n * bits, bitorder="little")
    weights = 1 << np.arange(bits, dtype=np.int64)
    return planes.reshape(n, bits).astype(np.int64) @ weights


# --------------------------------------------------------------------------- values


def _quantised(name: str, tensor: torch.Tensor, values: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored values of a weight tensor (all entries, row-major) and its int8 scales."""
    w = tensor.detach().to("cpu", torch.float32)
    if values == "float32":
        return w.numpy().reshape(-1), None  # exact, NaN and inf included
    bad = ~torch.isfinite(w)
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"save: tensor {name!r} holds {int(bad.sum())} non-finite value(s) (first at {first}: "
            f"{float(w[first])}); values={values!r} cannot store them faithfully. Fix the model, or "
            f"save with values='float32', which keeps every value as it is."
        )
    if values == "float16":
        half = w.to(torch.float16)
        overflow = torch.isinf(half)
        if overflow.any():
            first = tuple(int(i) for i in torch.nonzero(overflow)[0])
            raise ValueError(
                f"save: tensor {name!r} holds values beyond float16's range (first at {first}: "
                f"{float(w[first])}; float16 reaches ±65504); save with values='float32' or 'int8'."
            )
        tiny = torch.finfo(torch.float16).smallest_normal * 2.0**-10  # smallest subnormal
        lost = (half == 0) & (w != 0)  # keep the sparsity pattern
        half[lost] = (torch.sign(w[lost]) * tiny).to(torch.float16)
        return half.numpy().reshape(-1), None
    rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / scale[:, None]).clamp(-127, 127)
    q = torch.where((q == 0) & (rows != 0), torch.sign(rows), q)  # keep the sparsity pattern
    return q.to(torch.int8).numpy().reshape(-1), scale.numpy().astype(np.float32)


def _dequantised(flat: np.ndarray, scale: np.ndarray | None, shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.from_numpy(flat.astype(np.float32))
    if scale is not None:
        rows = t.reshape(len(scale), -1) * torch.from_numpy(scale)[:, None]
        t = rows.reshape(-1)
    return t.reshape(shape)


# --------------------------------------------------------------------------- encodings


def _encode_nm(flat: np.ndarray, shape: tuple[int, ...], nm: tuple[int, int, str]) -> bytes:
    """The ``nm`` format: per run its ``n`` values (non-zeros first, in run order, then zeros
    at the lowest free positions), then every position packed in ``ceil(log2 m)`` bits."""
    n, m, layout = nm
    matrix = nm_view(torch.from_numpy(flat.reshape(shape)), layout)
    runs = matrix.reshape(matrix.shape[0], -1, m)
    order = (runs == 0).to(torch.int64) * m + torch.arange(m)  # non-zeros first, then by position
    positions = torch.argsort(order, dim=-1, stable=True)[..., :n]
    values = torch.gather(runs, -1, positions)
    return values.contiguous().numpy().tobytes() + _pack(positions.reshape(-1).numpy(), nm_position_bits(m))


def _nm_geometry(
    entry: dict, shape: tuple[int, ...], size: int, n_bytes: int, where: str
) -> tuple[int, int, str, int, int, int]:
    """``(n, m, layout, rows, per_row, runs)`` of an ``nm`` entry, checked against its ``n_bytes``
    of payload (values of ``size`` bytes) before anything is allocated."""
    n, m, layout = entry.get("n"), entry.get("m"), entry.get("layout")
    _expect(
        _is_int(n) and _is_int(m) and 0 < n < m <= MAX_NM_M,
        where,
        f"N:M entry with n={n!r}, m={m!r} (needs 0 < n < m <= {MAX_NM_M})",
    )
    _expect(
        isinstance(layout, str)
        and layout in NM_LAYOUTS
        and len(shape) >= 2
        and (layout == "conv" or len(shape) == 2)
        and all(d > 0 for d in shape),
        where,
        f"N:M entry of layout {layout!r} for shape {shape}",
    )
    n, m, layout = cast(int, n), cast(int, m), cast(str, layout)  # checked above
    rows = shape[1] if layout == "transposed" else shape[0]
    numel = math.prod(shape)
    per_row = numel // rows
    per_position = shape[1] if layout == "conv" else per_row
    _expect(per_position % m == 0, where, f"rows of {per_row} inputs in runs of {m}")
    runs = numel // m
    bits = nm_position_bits(m)
    _expect(
        n_bytes == runs * n * size + bits_to_bytes(runs * n * bits),
        where,
        f"{n_bytes} bytes for {runs} runs of {n} values of {size} bytes and {bits}-bit positions",
    )
    return n, m, layout, rows, per_row, runs


def _decode_nm(data: bytes, entry: dict, dtype: np.dtype, shape: tuple[int, ...], where: str) -> np.ndarray:
    size = dtype.itemsize
    n, m, layout, rows, per_row, runs = _nm_geometry(entry, shape, size, len(data), where)
    bits = nm_position_bits(m)
    values = np.frombuffer(data[: runs * n * size], dtype=dtype).reshape(rows, per_row // m, n)
    positions = _unpack(data[runs * n * size :], runs * n, bits).reshape(rows, per_row // m, n)
    ordered = np.sort(positions, axis=-1)
    _expect(
        int(positions.max(initial=0)) < m and bool(np.all(np.diff(ordered, axis=-1) > 0)),
        where,
        f"in-run positions outside 0..{m - 1} or repeated",
    )
    matrix = np.zeros((rows, per_row // m, m), dtype=dtype)
    np.put_along_axis(matrix, positions, values, axis=-1)
    tensor = nm_unview(torch.from_numpy(matrix.reshape(rows, per_row)), shape, layout)
    return tensor.contiguous().numpy().reshape(-1)


def _encode(flat: np.ndarray, encoding: str, index_bits: int) -> tuple[bytes, int]:
    """``flat`` (stored values, zeros included) in ``encoding``, and the number of CSR entries."""
    if encoding == "dense":
        return flat.tobytes(), 0
    nz = np.flatnonzero(flat)
    if encoding == "bitmask":
        present = np.zeros(flat.size, dtype=np.uint8)
        present[nz] = 1
        return np.packbits(present, bitorder="little").tobytes() + flat[nz].tobytes(), 0
    span = 1 << index_bits
    gaps = np.diff(nz, prepend=-1) - 1
    fillers = gaps // span
    ends = np.cumsum(fillers + 1) - 1  # each non-zero's entry, after its fillers
    skips = np.full(int(ends[-1]) + 1 if len(ends) else 0, span - 1, dtype=np.int64)
    skips[ends] = gaps - fillers * span
    stored = np.zeros(len(skips), dtype=flat.dtype)
    stored[ends] = flat[nz]
    return stored.tobytes() + _pack(skips, index_bits), len(skips)


def _decode(data: bytes, entry: dict, dtype: np.dtype, n: int, where: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    encoding, size = entry["encoding"], dtype.itemsize
    if encoding == "nm":
        return _decode_nm(data, entry, dtype, shape, where)
    if encoding == "dense":
        _expect(len(data) == n * size, where, f"{len(data)} bytes for {n} dense values")
        return np.frombuffer(data, dtype=dtype).copy()
    if encoding == "bitmask":
        mask_bytes = bits_to_bytes(n)
        _expect(len(data) >= mask_bytes, where, "a bit-mask shorter than the tensor")
        flat = np.zeros(n, dtype=dtype)
        present = np.unpackbits(np.frombuffer(data[:mask_bytes], dtype=np.uint8), count=n, bitorder="little").astype(
            bool
        )
        nonzero = np.frombuffer(data[mask_bytes:], dtype=dtype)
        _expect(
            len(data) - mask_bytes == int(present.sum()) * size,
            where,
            f"{int(present.sum())} mask bits set but {len(data) - mask_bytes} bytes of values",
        )
        flat[present] = nonzero
        return flat
    if encoding == "csr":
        r = entry["index_bits"]
        entries = entry["entries"]
        _expect(
            len(data) == entries * size + bits_to_bytes(entries * r),
            where,
            f"{len(data)} bytes for {entries} CSR entries of {size} + {r}/8 bytes",
        )
        _expect(entries <= n, where, f"{entries} CSR entries for a tensor of {n}")
        flat = np.zeros(n, dtype=dtype)
        stored = np.frombuffer(data[: entries * size], dtype=dtype)
        positions = np.cumsum(_unpack(data[entries * size :], entries, r) + 1) - 1
        _expect(entries == 0 or positions[-1] < n, where, f"CSR positions run past the tensor's {n} entries")
        flat[positions] = stored
        return flat
    raise ModelFileError(f"{where}: unknown encoding {encoding!r}; valid encodings: dense, bitmask, csr, nm.")


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise ModelFileError(f"{where}: the file is inconsistent ({what}); it is damaged or was edited.")


# --------------------------------------------------------------------------- header checks


def _is_int(value: object) -> TypeGuard[int]:
    return type(value) is int


def _declared(header: dict, payload_bytes: int, where: str) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the header's tensor entries, after checking every size, count, offset,
    index width and encoding field of every entry against the payload it describes (and the
    limits above), so that decoding allocates only what the payload accounts for. The entries
    must tile the payload: back to back, no overlap, no byte left over."""
    entries = header.get("tensors")
    _expect(isinstance(entries, list), where, "no tensor list in the header")
    shapes: dict[str, tuple[int, ...]] = {}
    spans: list[tuple[int, int]] = []
    stored: dict[str, tuple[tuple[int, ...], str]] = {}
    for k, entry in enumerate(cast(list, entries)):
        if isinstance(entry, dict) and "same_as" in entry:
            name, shape = _check_tie(entry, k, stored, where)
        else:
            name, shape, span = _check_entry(entry, k, payload_bytes, where)
            spans.append(span)
            stored[name] = (shape, entry["dtype"])
        _expect(name not in shapes, where, f"tensor {name!r} is listed twice")
        shapes[name] = shape
    end = 0
    for start, stop in sorted(spans):
        _expect(
            start == end,
            where,
            f"tensor bytes {'overlap' if start < end else 'leave a gap'} at payload offset {min(start, end)}",
        )
        end = stop
    _expect(end == payload_bytes, where, f"the tensors take {end} of the {payload_bytes} payload bytes")
    return shapes


def _check_tie(entry: dict, k: int, stored: dict, where: str) -> tuple[str, tuple[int, ...]]:
    """A tied entry: no bytes of its own, the shape and dtype of the earlier stored entry it names."""
    name, first = entry.get("name"), entry.get("same_as")
    _expect(isinstance(name, str) and name != "", where, f"tensor entry {k} has no name")
    _expect(
        isinstance(first, str) and first in stored,
        where,
        f"tensor {name!r} is tied to {str(first)[:80]!r}, which is not an earlier stored tensor",
    )
    shape, dtype = stored[first]
    _expect(
        entry.get("shape") == list(shape) and entry.get("dtype") == dtype,
        where,
        f"tensor {name!r} is tied to {first!r} but declares another shape or dtype",
    )
    return cast(str, name), shape


def _check_entry(entry, k: int, payload_bytes: int, where: str) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """One tensor entry's name, shape and byte span, every field checked (see :func:`_declared`)."""
    _expect(isinstance(entry, dict), where, f"tensor entry {k} is not a mapping")
    name = entry.get("name")
    _expect(isinstance(name, str) and name != "", where, f"tensor entry {k} has no name")
    what = f"tensor {name!r}"
    shape = entry.get("shape")
    _expect(
        isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d) and d >= 0 for d in shape),
        where,
        f"{what} has shape {str(shape)[:80]} (needs a list of at most {MAX_DIMS} ints >= 0)",
    )
    numel = math.prod(shape)
    _expect(numel <= MAX_ELEMENTS, where, f"{what} declares {numel} elements, more than the limit of {MAX_ELEMENTS}")
    for key in ("dtype", "values"):
        _expect(
            isinstance(entry.get(key), str) and entry[key] in _DTYPES,
            where,
            f"{what} has {key} {str(entry.get(key))[:40]!r}; valid: {', '.join(_DTYPES)}",
        )
    start, n_bytes = entry.get("offset"), entry.get("bytes")
    _expect(
        _is_int(start) and _is_int(n_bytes) and start >= 0 and n_bytes >= 0 and start + n_bytes <= payload_bytes,
        where,
        f"{what} runs past the payload",
    )
    body = n_bytes
    if "scales" in entry:  # int8 weights: one float32 scale per output row first
        rows = shape[0] if len(shape) > 1 else 1
        _expect(
            entry["scales"] == rows and _is_int(entry["scales"]) and numel > 0 and 4 * rows <= n_bytes,
            where,
            f"{what} has {str(entry['scales'])[:20]} scales for {rows} rows in {n_bytes} bytes",
        )
        body -= 4 * rows
    size = torch.empty(0, dtype=_DTYPES[entry["values"]]).element_size()
    _check_body(entry, tuple(shape), numel, size, body, f"{where}, {what}")
    return name, tuple(shape), (start, start + n_bytes)


def _check_body(entry: dict, shape: tuple[int, ...], numel: int, size: int, n_bytes: int, where: str) -> None:
    """The encoded tensor's byte count against what its encoding needs for ``numel`` values."""
    encoding = entry.get("encoding")
    if encoding == "dense":
        _expect(n_bytes == numel * size, where, f"{n_bytes} bytes for {numel} dense values of {size} bytes")
    elif encoding == "bitmask":
        mask = bits_to_bytes(numel)
        values, rest = divmod(n_bytes - mask, size)
        _expect(
            n_bytes >= mask and rest == 0 and values <= numel,
            where,
            f"{n_bytes} bytes for a bit-mask of {numel} elements ({mask} bytes) and values of {size} bytes",
        )
    elif encoding == "csr":
        bits, count = entry.get("index_bits"), entry.get("entries")
        _expect(
            _is_int(bits) and 1 <= bits <= MAX_INDEX_BITS,
            where,
            f"CSR index width {str(bits)[:20]} (needs an int in [1, {MAX_INDEX_BITS}])",
        )
        _expect(
            _is_int(count) and 0 <= count <= numel,
            where,
            f"{str(count)[:20]} CSR entries for a tensor of {numel} elements",
        )
        bits, count = cast(int, bits), cast(int, count)  # checked above
        _expect(
            n_bytes == count * size + bits_to_bytes(count * bits),
            where,
            f"{n_bytes} bytes for {count} CSR entries of {size} bytes + {bits} bits",
        )
    elif encoding == "nm":
        _nm_geometry(entry, shape, size, n_bytes, where)
    else:
        raise ModelFileError(
            f"{where}: unknown encoding {str(encoding)[:40]!r}; valid encodings: dense, bitmask, csr, nm."
        )


# --------------------------------------------------------------------------- which tensors shrink


def weight_names(model: nn.Module) -> set[str]:
    """State-dict names of the tensors stored at reduced precision: the ``weight`` of every
    Linear, Conv and HashedNets layer."""
    from prunelab.models.hashed import HashedLayer

    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, (*_WEIGHT_LAYERS, HashedLayer)) and isinstance(module.weight, torch.Tensor)
    }


#: The storage options save and predict_bytes declare (the names are checked by _check_options).
_OPTIONS: dict[str, list[Constraint]] = {"encoding": [STR], "values": [STR], "index_bits": INDEX_BITS_OR_AUTO}


def _check_options(encoding: object, values: object, index_bits: object, where: str) -> tuple[str, str, int | str]:
    check_type("encoding", encoding, str, where=where)
    check_type("values", values, str, where=where)
    if encoding not in ENCODINGS:
        raise ValueError(
            f"{where}: unknown encoding {encoding!r}{suggest(cast(str, encoding), ENCODINGS)}; "
            f"valid encodings: {', '.join(ENCODINGS)}."
        )
    if values not in VALUES:
        raise ValueError(
            f"{where}: unknown values {values!r}{suggest(cast(str, values), VALUES)}; "
            f"valid value types: {', '.join(VALUES)}."
        )
    _, index_bits = check_storage_bits(32, index_bits, where)
    return encoding, values, index_bits


def _layouts(model: nn.Module) -> dict[str, str]:
    """``{state-dict name: layout}`` of the weights with output rows and inputs (N:M candidates)."""
    from prunelab.pruning.targets import layout_of

    out = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            layout = layout_of(module, param_name)
            if layout in NM_LAYOUTS:
                out[f"{module_name}.{param_name}" if module_name else param_name] = layout
    return out


def tied_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{name: first name}`` for the state-dict entries that are the same memory as an earlier
    entry (tied weights, e.g. a language model's head and its token embedding)."""
    first: dict[tuple, str] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        if tensor.numel() == 0:
            continue
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def _plan(model: nn.Module, encoding: str, values: str, index_bits: int | str):
    """Per state-dict tensor: (name, tensor, stored flat values, scales, encoding, value type,
    CSR index width, N:M ``(n, m, layout)`` or None, predicted bytes from the storage formulas).
    A tensor tied to an earlier one is ``(name, tensor, None, None, "tied", first name, 0, None, 0)``."""
    shrink = weight_names(model)
    layouts = _layouts(model)
    state = model.state_dict()
    tied = tied_names(state)
    for name, tensor in state.items():
        if name in tied:  # stored once, under the first name
            yield name, tensor, None, None, "tied", tied[name], 0, None, 0
            continue
        tensor = tensor.detach().cpu()
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        if dtype_name not in _DTYPES:
            raise TypeError(
                f"save: tensor {name!r} has dtype {tensor.dtype}, which a model file cannot hold; "
                f"valid dtypes: {', '.join(_DTYPES)}."
            )
        if not tensor.is_floating_point():
            flat = tensor.contiguous().numpy().reshape(-1)
            yield name, tensor, flat, None, "dense", dtype_name, 0, None, flat.nbytes
            continue
        if name in shrink and tensor.numel():  # an empty weight has no rows to scale: kept exact
            flat, scale = _quantised(name, tensor, values)
            kind = values
        else:
            flat, scale = tensor.contiguous().numpy().reshape(-1), None
            kind = dtype_name
        bits, as_tensor = flat.dtype.itemsize * 8, torch.from_numpy(flat.copy())
        width = best_index_bits(as_tensor, bits) if index_bits == "auto" else index_bits
        nm = nm_pattern(tensor, layouts[name]) if name in layouts else None
        sizes = storage_bits(as_tensor, bits, width, nm)
        if encoding == "nm":
            chosen = "nm" if nm is not None else best_format(sizes)
        else:
            chosen = encoding if encoding != "auto" else best_format(sizes)
        predicted = bits_to_bytes(sizes[chosen]) + (0 if scale is None else scale.nbytes)
        nm_info = (*cast("tuple[int, int]", nm), layouts[name]) if chosen == "nm" else None  # "nm": nm is set
        yield name, tensor, flat, scale, chosen, kind, width, nm_info, predicted


@validate_params({"model": [MODEL], **_OPTIONS})
def predict_bytes(
    model: nn.Module, *, encoding: str = "auto", values: str = "float32", index_bits: int | str = "auto"
) -> int:
    """Payload bytes :func:`save` writes for ``model``, from the storage formulas of
    docs/methods.md §7 (:func:`prunelab.metrics.storage.storage_bits`) plus 4 bytes per int8 scale.

    With ``values="float32"`` and a model whose state dict holds only its parameters, this
    equals ``prunelab.summary(model, ..., index_bits=index_bits).total.bytes_best``
    (``encoding="auto"``)."""
    encoding, values, index_bits = _check_options(encoding, values, index_bits, "predict_bytes")
    return sum(entry[-1] for entry in _plan(model, encoding, values, index_bits))


# --------------------------------------------------------------------------- save


def _header_bytes(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@validate_params({"model": [MODEL], "path": [PATH], **_OPTIONS, "metadata": [MAPPING, None]})
def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    encoding: str = "auto",
    values: str = "float32",
    index_bits: int | str = "auto",
    metadata: Mapping | None = None,
) -> ExportReport:
    """Write ``model`` as a compressed prunelab model file; return what was written.

    Args:
        model: any ``nn.Module``; one from :func:`prunelab.build_model` (``model.config``)
            is rebuilt by :func:`load` on its own, any other needs ``load(path, model=...)``.
            Thinned models (fewer units than their config) and HashedNets models work.
        encoding: ``"auto"`` (each tensor's smallest format), ``"dense"``, ``"bitmask"``
            or ``"csr"`` (forced for every floating tensor), or ``"nm"`` (every weight with an
            N:M pattern in the N:M format, the others as ``"auto"``).
        values: ``"float32"`` (exact), ``"float16"`` or ``"int8"`` for the layer weights.
        index_bits: bits per CSR relative index, in ``[1, 16]``, or ``"auto"`` (each
            tensor's best width, which :func:`prunelab.summary` also computes with
            ``index_bits="auto"``).
        metadata: JSON-serialisable extras kept in the header (e.g. accuracy, dataset).

    The file is written to a new temporary file next to ``path`` (a random name, opened
    exclusively, never through a symlink) and renamed, so a failed write never leaves a half
    file under ``path`` and a symlink at ``path`` is replaced, not written through.
    """
    where = "save"
    check_type("model", model, nn.Module, where=where)
    check_materialised(model, where)
    encoding, values, index_bits = _check_options(encoding, values, index_bits, where)
    if metadata is not None:
        check_type("metadata", metadata, Mapping, where=where)
        try:
            json.dumps(dict(metadata), allow_nan=False)
        except (TypeError, ValueError) as err:
            raise TypeError(f"save: metadata must be JSON-serialisable: {err}") from None
    from prunelab.sparse import SparseLinear, densify

    if any(isinstance(m, SparseLinear) for m in model.modules()):
        model = densify(model)  # the same file as the model before sparsify()
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"save: {str(path)!r} is a directory; give a file name, e.g. {str(path / 'model.plm')!r}.")
    config = getattr(model, "config", None)
    if config is not None:
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError):
            config = None

    chunks, entries, report_rows, offset, predicted_bytes = [], [], [], 0, 0
    for name, tensor, flat, scale, chosen, kind, width, nm, predicted in _plan(model, encoding, values, index_bits):
        if chosen == "tied":  # no bytes: the tensor of an earlier entry
            entries.append(
                {
                    "name": name,
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).removeprefix("torch."),
                    "same_as": kind,
                }
            )
            report_rows.append(TensorEntry(name, tuple(tensor.shape), int(torch.count_nonzero(tensor)), "tied", "-", 0))
            continue
        predicted_bytes += predicted
        blob, n_entries = (_encode_nm(flat, tuple(tensor.shape), nm), 0) if nm else _encode(flat, chosen, width)
        scale_blob = b"" if scale is None else scale.tobytes()
        entry = {
            "name": name,
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "values": kind,
            "encoding": chosen,
            "offset": offset,
            "bytes": len(scale_blob) + len(blob),
        }
        if scale is not None:
            entry["scales"] = len(scale)
        if chosen == "csr":
            entry["index_bits"] = width
            entry["entries"] = n_entries
        if nm:
            entry["n"], entry["m"], entry["layout"] = nm
        chunks += [scale_blob, blob]
        offset += entry["bytes"]
        entries.append(entry)
        report_rows.append(
            TensorEntry(
                name, tuple(tensor.shape), int(np.count_nonzero(flat)), chosen, kind, entry["bytes"], len(scale_blob)
            )
        )
    payload = b"".join(chunks)
    header = {
        "format": "prunelab-model",
        "version": VERSION,
        "prunelab": _version(),
        "architecture": config,
        "class": type(model).__name__,
        "tensors": entries,
        "sizes": size_attributes(model),
        "payload_bytes": len(payload),
        "metadata": dict(metadata or {}),
    }
    core = _header_bytes(header)
    header["sha256"] = hashlib.sha256(core + payload).hexdigest()
    head = _header_bytes(header)
    data = MAGIC + struct.pack("<BI", VERSION, len(head)) + head + payload

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)  # a new random temporary file, renamed: never a planted name
    return ExportReport(path, len(data), len(head), len(payload), predicted_bytes, report_rows)


def _version() -> str:
    from prunelab._version import __version__

    return __version__


# --------------------------------------------------------------------------- load


def file_start(path: str | os.PathLike, n: int = len(MAGIC)) -> bytes:
    """The first ``n`` bytes of ``path`` (``b""`` if it is not a file), without reading the rest."""
    path = Path(path)
    if not path.is_file():
        return b""
    with open(path, "rb") as f:
        return f.read(n)


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a prunelab model file, after checking its integrity (magic, version,
    lengths and the SHA-256 over header and payload) and every tensor entry against the payload."""
    header, payload = _read(Path(path))
    _declared(header, len(payload), f"load {str(path)!r}")
    return header


def _read(path: Path) -> tuple[dict, bytes]:
    where = f"load {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"load: no model file at {str(path)!r}.")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        what = "a torch.save file" if data.startswith(_TORCH_FILE_STARTS) else "not a prunelab model file"
        raise ModelFileError(f"{where}: {what} (it does not start with {MAGIC!r}).")
    if len(data) < PREAMBLE:
        raise ModelFileError(f"{where}: truncated: {len(data)} bytes, shorter than the {PREAMBLE}-byte preamble.")
    version, head_len = struct.unpack("<BI", data[len(MAGIC) : PREAMBLE])
    if version != VERSION:
        raise ModelFileError(f"{where}: format version {version}; this prunelab reads version {VERSION}.")
    if PREAMBLE + head_len > len(data):
        raise ModelFileError(
            f"{where}: truncated: the header needs {head_len} bytes, "
            f"the file has {len(data) - PREAMBLE} after the preamble."
        )
    if head_len > MAX_HEADER_BYTES:
        raise ModelFileError(
            f"{where}: the header declares {head_len:,} bytes, more than the limit of "
            f"{MAX_HEADER_BYTES:,}; the file is damaged."
        )
    try:
        header = json.loads(data[PREAMBLE : PREAMBLE + head_len])
    except RecursionError:
        raise ModelFileError(
            f"{where}: the header is nested too deeply to be a prunelab header; the file is damaged."
        ) from None
    except ValueError as err:  # not UTF-8, not JSON, or an integer of thousands of digits
        raise ModelFileError(f"{where}: the header is not valid JSON ({err}); the file is damaged.") from None
    if not isinstance(header, dict) or header.get("format") != "prunelab-model":
        raise ModelFileError(f"{where}: the header does not describe a prunelab model.")
    payload = data[PREAMBLE + head_len :]
    expected = header.get("payload_bytes")
    if not isinstance(expected, int) or len(payload) != expected:
        state = "truncated" if isinstance(expected, int) and len(payload) < expected else "the wrong length"
        raise ModelFileError(f"{where}: {state}: the payload has {len(payload)} bytes, the header says {expected}.")
    digest = header.pop("sha256", None)
    if digest != hashlib.sha256(_header_bytes(header) + payload).hexdigest():
        raise ModelFileError(
            f"{where}: checksum mismatch: the header or the weights were changed after "
            f"the file was written (SHA-256 {str(digest)[:12]}... does not match)."
        )
    return header, payload


def _tensors(header: dict, payload: bytes, where: str) -> dict[str, torch.Tensor]:
    entries = header.get("tensors")
    _expect(isinstance(entries, list), where, "no tensor list in the header")
    out: dict[str, torch.Tensor] = {}
    for k, entry in enumerate(cast(list, entries)):
        if isinstance(entry, dict) and "same_as" in entry:  # checked by _declared: an earlier tensor
            _expect(entry["same_as"] in out, where, f"tensor {entry.get('name')!r} is tied to an unknown tensor")
            out[entry["name"]] = out[entry["same_as"]]
            continue
        try:
            out.update(_tensor(entry, payload, where))
        except (KeyError, TypeError, IndexError, OverflowError, ValueError) as err:
            if isinstance(err, ModelFileError):
                raise
            raise ModelFileError(
                f"{where}: tensor entry {k} of the header is malformed ({type(err).__name__}: {err})."
            ) from None
    return out


def _tensor(entry: dict, payload: bytes, where: str) -> dict[str, torch.Tensor]:
    name, shape = entry["name"], tuple(int(d) for d in entry["shape"])
    dtype, stored = _DTYPES.get(entry["dtype"]), _DTYPES.get(entry["values"])
    if dtype is None or stored is None:
        raise ModelFileError(
            f"{where}: tensor {name!r} has unknown dtype {entry['dtype']!r} or values "
            f"{entry['values']!r}; valid: {', '.join(_DTYPES)}."
        )
    start, size = int(entry["offset"]), int(entry["bytes"])
    _expect(0 <= start and 0 <= size and start + size <= len(payload), where, f"tensor {name!r} runs past the payload")
    blob, scale = payload[start : start + size], None
    if "scales" in entry:  # int8 weights: float32 scales first
        k = int(entry["scales"])
        _expect(0 < k and 4 * k <= len(blob), where, f"tensor {name!r} has {k} scales in {len(blob)} bytes")
        scale, blob = np.frombuffer(blob[: 4 * k], dtype=np.float32).copy(), blob[4 * k :]
    n = int(np.prod(shape)) if shape else 1
    flat = _decode(blob, entry, torch.empty(0, dtype=stored).numpy().dtype, n, f"{where}, tensor {name!r}", shape)
    if stored != dtype:
        return {name: _dequantised(flat, scale, shape).to(dtype)}
    return {name: torch.from_numpy(flat).reshape(shape)}


@validate_params({"path": [PATH], "model": [MODEL, None]})
def load(path: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved in ``path`` (a prunelab model file, or a ``torch.save`` file of
    ``prunelab prune/units --save``), on the CPU, in eval mode.

    Nothing in the file is executed: model files are JSON and raw bytes; torch files are
    read with ``torch.load(..., weights_only=True)``, which refuses pickled code.

    Args:
        path: the file, or a directory written by :func:`prunelab.hf.save_pretrained` (a stock
            Hugging Face checkpoint, or a prunelab file of a model no stock config describes).
        model: the module to load into, for models not from the registry (files without an
            architecture). It is filled in place and returned. When the file holds a thinned
            model (smaller tensors), the model's layers are resized to the file's shapes first
            (:func:`reshape_to`); every size is checked before anything is resized.

    Raises:
        FileNotFoundError: no such file.
        ModelFileError (a ValueError): not a model file, truncated, tampered with (checksum),
            or tensors that do not fit the architecture; the message names what is wrong.
    """
    path = Path(path)
    where = f"load {str(path)!r}"
    if model is not None:
        check_type("model", model, nn.Module, where="load")
    if path.is_dir():  # a Hugging Face directory of prunelab.save_pretrained
        return load_directory(path, model=model)
    header = None
    if file_start(path).startswith(_TORCH_FILE_STARTS):
        config, state = _read_torch(path, where)
        if model is None:  # the architecture named in the file, held to the file's size
            input_shape = config.get("input_shape") if isinstance(config, dict) else None
            _check_architecture(
                lambda: _build(config, where),
                {k: tuple(t.shape) for k, t in state.items()},
                path.stat().st_size,
                input_shape,
                where,
                names=False,
            )
            model = _rebuild(config, state, where)
            _assign(model, state, where)
            return model.eval()
    else:
        header, payload = _read(path)
        model, state = _from_model_file(header, payload, model, where)
    _same_keys(model, state, where)
    reshape_to(model, {name: tuple(t.shape) for name, t in state.items()}, where=where)
    if header is not None:
        _set_sizes(model, header.get("sizes") or {}, where)
    _assign(model, state, where)
    return model.eval()


@validate_params({"directory": [PATH], "model": [MODEL, None]})
def load_directory(directory: str | os.PathLike, *, model: nn.Module | None = None) -> nn.Module:
    """The model that :func:`prunelab.hf.save_pretrained` wrote in ``directory``, in eval mode: its
    prunelab model file (``model.plm``, rebuilt from the Hugging Face config inside it, or loaded
    into ``model``), or its stock checkpoint loaded by the class's ``from_pretrained``
    (:func:`prunelab.hf_load.load_stock`). :func:`load` of a directory and
    :func:`prunelab.hf.load_pretrained` come here."""
    directory = Path(directory)
    where = f"load {str(directory)!r}"
    if (directory / PLM_NAME).is_file():
        return load(directory / PLM_NAME, model=model)
    if (directory / CONFIG_NAME).is_file():
        return load_stock(directory, model, where)
    raise ModelFileError(
        f"{where}: the directory holds neither {PLM_NAME} nor {CONFIG_NAME}; is it a directory "
        f"written by prunelab.save_pretrained?"
    )


def _from_model_file(
    header: dict, payload: bytes, model: nn.Module | None, where: str
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model to fill — the given one, or the file's own architecture (a registry config, or a
    Hugging Face class and config) built only after every check — and the decoded tensors.
    Every size in the header is checked against the payload first, then the architecture as a
    meta-device skeleton, so nothing the file describes is allocated before it is accounted for."""
    declared = _declared(header, len(payload), where)
    config = header.get("architecture")
    metadata = header.get("metadata")
    hf = metadata.get("huggingface") if isinstance(metadata, dict) else None
    if model is None and config is None and hf is not None:  # from prunelab.save_pretrained
        _check_architecture(lambda: build_from_metadata(hf, where), declared, len(payload), None, where)
        model = build_from_metadata(hf, where)
    if model is not None:
        _check_declared(declared, model, where)  # no tensor larger than the model's
        return model, _tensors(header, payload, where)
    if config is None:
        raise ModelFileError(
            f"{where}: the file was saved from a {header.get('class')} that is not a "
            f"registry model, so it holds no architecture; pass load(path, model=...)."
        )
    input_shape = config.get("input_shape") if isinstance(config, dict) else None
    skeleton = _check_architecture(lambda: _build(config, where), declared, len(payload), input_shape, where)
    checked = _dry_run_on_meta(skeleton, config, declared, where)
    built = _build(config, where)
    state = _tensors(header, payload, where)
    return _fit(built, config, state, where, dry_run=not checked), state


def _read_torch(path: Path, where: str) -> tuple[dict | None, dict[str, torch.Tensor]]:
    import pickle

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes about pickle protocols of foreign files
            saved = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(
            f"{where}: refused: the file asks to run code or build objects other than "
            f"tensors while loading ({first}). prunelab loads torch files only with "
            f"weights_only=True."
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise ModelFileError(f"{where}: not a readable torch file ({err}).") from None
    config, state = None, saved
    if isinstance(saved, dict) and "state_dict" in saved:
        config, state = saved.get("config"), saved["state_dict"]
        if saved.get("plan"):
            config = dict(config or {}, _plan=saved["plan"])
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{where}: the torch file holds no state dict of tensors.")
    return config, dict(state)


def _build(config: dict | None, where: str) -> nn.Module:
    """The registry model of ``config`` (without a thinning plan), at its full size."""
    from prunelab.models import build_model

    if not isinstance(config, dict) or "name" not in config:
        raise ModelFileError(f"{where}: the file holds no registry architecture; pass load(path, model=...).")
    config = {k: v for k, v in config.items() if k != "_plan"}
    try:
        return build_model(**config)
    except ModelFileError:
        raise
    except (ValueError, TypeError) as err:
        raise ModelFileError(f"{where}: its architecture {str(config)[:300]} cannot be built: {err}") from None


def _rebuild(config: dict | None, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    model = _build(config, where)
    assert config is not None  # _build refuses anything but a dict
    plan = config.get("_plan")
    if plan:
        from prunelab import units

        return units.thin(
            model,
            {k: torch.tensor(v, dtype=torch.long) for k, v in plan.items()},
            input_shape=config.get("input_shape"),
        )
    return _fit(model, config, state, where)


def _fit(
    model: nn.Module, config: dict, state: dict[str, torch.Tensor], where: str, *, dry_run: bool = True
) -> nn.Module:
    """The registry ``model`` with its layers resized to ``state`` (a thinned model), checked by a dry
    run (unless ``dry_run`` is False: it already ran on a meta-device skeleton)."""
    _same_keys(model, state, where)
    if _resize(model, state, where) and dry_run:
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, *config["input_shape"], dtype=_input_dtype(model)))
        except RuntimeError as err:
            raise ModelFileError(f"{where}: the stored (thinned) shapes do not fit together: {err}") from None
    return model


def _input_dtype(model: nn.Module) -> torch.dtype:
    """``torch.long`` for a model whose first parameterised layer is an ``nn.Embedding`` (it takes
    token ids, e.g. the registry's language models), else the default float dtype."""
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    return torch.long if isinstance(first, nn.Embedding) else torch.get_default_dtype()


def _check_declared(declared: dict[str, tuple[int, ...]], model: nn.Module, where: str) -> None:
    """The header's tensor names and shapes (:func:`_declared`) against ``model``, before any tensor
    is decoded: the same names, and no shape larger than the model's (a thinned file is only
    smaller), so a crafted header cannot make ``load`` allocate more than the model holds."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(declared)), sorted(set(declared) - set(own))
    if missing or unexpected:
        raise ModelFileError(
            f"{where}: the tensors do not match the model: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}."
        )
    grown = [
        f"tensor {name!r} has shape {shape} in the file but {tuple(own[name].shape)} in the model"
        for name, shape in declared.items()
        if len(shape) != own[name].dim() or any(a > b or a < 0 for a, b in zip(shape, own[name].shape))
    ]
    if grown:
        raise ModelFileError(
            f"{where}: {'; '.join(grown)} (a thinned model is resized only to smaller sizes; "
            f"is this the model the file was saved from?)."
        )


class _Oversized(Exception):
    """A skeleton build that registered more modules and tensors than its budget (see :func:`_skeleton`)."""


def _skeleton(build, n_tensors: int, where: str) -> nn.Module:
    """``build()`` on the meta device: the architecture's modules and tensor shapes without their
    memory. The build is stopped as soon as it has registered more modules and tensors than a
    model of ``n_tensors`` stored tensors could need, so a config of a million layers costs nothing."""
    from torch.nn.modules import module as hooks

    budget, count, owner = 4 * n_tensors + 256, [0], threading.get_ident()

    def count_one(*_):
        if threading.get_ident() == owner:
            count[0] += 1
            if count[0] > budget:
                raise _Oversized

    handles = [
        hooks.register_module_module_registration_hook(count_one),
        hooks.register_module_parameter_registration_hook(count_one),
        hooks.register_module_buffer_registration_hook(count_one),
    ]
    try:
        with torch.device("meta"), _meta_normal_is_free():
            return build()
    except _Oversized:
        raise ModelFileError(
            f"{where}: its architecture has more than {budget} modules and tensors for the "
            f"{n_tensors} tensors the file stores; it does not describe this file."
        ) from None
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _meta_normal_is_free():
    """``Tensor.normal_`` returns a meta tensor as it is, for the block: torch's meta kernel of
    ``normal_`` is a Python reference whose first use imports sympy (3 s, 90 MB), while filling a
    tensor without values changes nothing. Every other tensor, in any thread, is filled as before."""
    original = torch.Tensor.normal_

    def normal_(self, *args, **kwargs):
        return self if self.is_meta else original(self, *args, **kwargs)

    torch.Tensor.normal_ = normal_
    try:
        yield
    finally:
        torch.Tensor.normal_ = original


def _check_architecture(
    build, declared: dict[str, tuple[int, ...]], payload_bytes: int, input_shape, where: str, *, names: bool = True
) -> nn.Module:
    """The model ``build()`` makes, as a meta-device skeleton, checked before it is built for real:
    its tensors against the ``declared`` ones (``names``), and the memory it and a dry-run input of
    ``input_shape`` need against the limit of ``FREE_BYTES + MAX_EXPANSION × payload_bytes``."""
    skeleton = _skeleton(build, len(declared), where)
    if names:
        _check_declared(declared, skeleton, where)
    tensors = {id(t): t for t in (*skeleton.parameters(), *skeleton.buffers())}
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    if isinstance(input_shape, (list, tuple)) and all(_is_int(d) and d >= 0 for d in input_shape):
        need += 4 * math.prod(input_shape)
    allowed = FREE_BYTES + MAX_EXPANSION * payload_bytes
    if need > allowed:
        raise ModelFileError(
            f"{where}: its architecture needs {need:,} bytes of memory, more than the "
            f"{allowed:,} that {payload_bytes:,} payload bytes may describe (16 MiB + "
            f'{MAX_EXPANSION} per payload byte, docs/export.md "Limits"); if you trust the file, '
            f"build the model yourself and pass load(path, model=...)."
        )
    return skeleton


def _dry_run_on_meta(skeleton: nn.Module, config: dict, declared: dict[str, tuple[int, ...]], where: str) -> bool:
    """Resize the meta ``skeleton`` to the ``declared`` (thinned) shapes and run it on a meta input:
    True when the shapes fit together (or nothing was resized), so the real model needs no dry run;
    a ModelFileError when they do not; False when the model uses an operation that cannot run on
    the meta device (no meta kernel, a value read): the real dry run then decides."""
    state = {name: torch.empty(shape, device="meta") for name, shape in declared.items()}
    with torch.device("meta"):
        _same_keys(skeleton, state, where)
        if not _resize(skeleton, state, where):
            return True
        try:
            with torch.no_grad():
                skeleton.eval()(torch.zeros(1, *config["input_shape"], dtype=_input_dtype(skeleton)))
        except NotImplementedError:
            return False
        except RuntimeError as err:
            if "meta" in str(err).lower():
                return False
            raise ModelFileError(f"{where}: the stored (thinned) shapes do not fit together: {err}") from None
        except (TypeError, ValueError, IndexError):
            return False
    return True


def _resize(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> bool:
    """Replace Linear / Embedding / Conv / BatchNorm layers whose stored shapes differ, and resize a
    recurrent layer's input (a thinned model)."""
    changed = False
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.RNNBase):
            changed = _resize_rnn_input(module, name, state) or changed
            continue
        weight = state.get(f"{name}.weight")
        if weight is None or getattr(module, "weight", None) is None or weight.shape == module.weight.shape:
            continue
        bias = getattr(module, "bias", None) is not None
        new: nn.Module
        if isinstance(module, nn.Linear) and weight.dim() == 2:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
        elif isinstance(module, nn.Embedding) and weight.dim() == 2:
            new = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=module.padding_idx)
        elif isinstance(module, nn.Conv2d) and weight.dim() == 4:
            new = nn.Conv2d(
                weight.shape[1] * module.groups,
                weight.shape[0],
                # torch types these tuple[int, ...]; a Conv2d holds pairs
                cast("tuple[int, int]", module.kernel_size),
                cast("tuple[int, int]", module.stride),
                cast("str | tuple[int, int]", module.padding),
                cast("tuple[int, int]", module.dilation),
                module.groups,
                bias,
                module.padding_mode,
            )
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and weight.dim() == 1:
            new = type(module)(weight.shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
        else:
            raise ModelFileError(
                f"{where}: tensor {name}.weight has shape {tuple(weight.shape)} but the "
                f"architecture's {type(module).__name__} has {tuple(module.weight.shape)}."
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        changed = True
    return changed


def _resize_rnn_input(module: nn.RNNBase, name: str, state: dict[str, torch.Tensor]) -> bool:
    """A thinned recurrent layer's first-layer input size (thinning cuts only its input columns)."""
    stored = state.get(f"{name}.weight_ih_l0")
    if stored is None or stored.dim() != 2 or stored.shape == module.weight_ih_l0.shape:
        return False
    for suffix in ("", "_reverse") if module.bidirectional else ("",):
        rows = getattr(module, f"weight_ih_l0{suffix}").shape[0]
        setattr(module, f"weight_ih_l0{suffix}", nn.Parameter(torch.empty(rows, stored.shape[1])))
    module.input_size = stored.shape[1]
    return True


def _same_keys(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelFileError(
            f"{where}: the tensors do not match the model: missing {missing or 'none'}, "
            f"unexpected {unexpected or 'none'}."
        )


def _assign(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    _same_keys(model, state, where)
    own = model.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ModelFileError(
                f"{where}: tensor {name!r} has shape {tuple(tensor.shape)} in the file but "
                f"{tuple(own[name].shape)} in the model."
            )
    model.load_state_dict(state)


# --------------------------------------------------------------------------- resizing a given model


def _size_checks(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> tuple[dict, list[str]]:
    """The new size attributes of ``module`` implied by its tensors' ``shapes`` (local names),
    and every inconsistency among them, without touching the module."""
    from prunelab.pruning.targets import is_hf_conv1d

    def shape(name):
        if name in shapes:
            return shapes[name]
        value = getattr(module, name, None)
        return tuple(value.shape) if torch.is_tensor(value) else None

    w, b, bad, attrs = shape("weight"), shape("bias"), [], {}
    if isinstance(module, nn.Linear):
        attrs = {"out_features": w[0], "in_features": w[1]}
        if b is not None and b != (w[0],):
            bad.append(f"bias {b} does not match weight {w}")
    elif isinstance(module, nn.modules.conv._ConvNd):
        # weight (out, in / groups, *k); transposed (in, out / groups, *k); a depthwise conv keeps groups = channels
        lead, per_group = (w[0], w[1])
        depthwise = 1 < module.groups == module.in_channels == module.out_channels
        groups = lead if depthwise else module.groups
        cin, out = (lead, per_group * groups) if module.transposed else (per_group * groups, lead)
        attrs = {"in_channels": cin, "out_channels": out, "groups": groups}
        if out % groups or cin % groups:
            bad.append(f"{cin} in / {out} out channels are not divisible into {groups} groups")
        if b is not None and b != (out,):
            bad.append(f"bias {b} does not match {out} output channels")
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        n = (w or shape("running_mean"))[0]
        attrs = {"num_features": n}
        for name in ("bias", "running_mean", "running_var"):
            if shape(name) is not None and shape(name) != (n,):
                bad.append(f"{name} {shape(name)} does not match {n} features")
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        attrs = {"normalized_shape": w if w is not None else module.normalized_shape}
        if b is not None and w is not None and b != w:
            bad.append(f"bias {b} does not match weight {w}")
    elif isinstance(module, nn.Embedding):
        attrs = {"num_embeddings": w[0], "embedding_dim": w[1]}
        if module.padding_idx is not None and module.padding_idx >= w[0]:
            bad.append(f"padding_idx {module.padding_idx} is outside {w[0]} embeddings")
    elif is_hf_conv1d(module):
        attrs = {"nf": w[1]}
        if b is not None and b != (w[1],):
            bad.append(f"bias {b} does not match weight {w} (stored (in, out))")
    elif isinstance(module, nn.MultiheadAttention):
        attrs, bad = _attention_sizes(module, shape)
    elif isinstance(module, nn.GroupNorm):
        attrs = {"num_channels": w[0]} if w is not None else {}
        if w is not None and w[0] % module.num_groups:
            bad.append(f"{w[0]} channels are not divisible into {module.num_groups} groups")
    elif w is not None and len(w) == 1 and set(dict(module.named_parameters(recurse=False))) <= {"weight", "bias"}:
        attrs = {}  # a weight-only norm (RMSNorm-like): no size attribute
        if b is not None and b != w:
            bad.append(f"bias {b} does not match weight {w}")
    else:
        return {}, [f"{type(module).__name__} cannot be resized by prunelab"]
    return attrs, bad


def _attention_sizes(module: nn.MultiheadAttention, shape) -> tuple[dict, list[str]]:
    """embed_dim / kdim / vdim / head_dim of a resized MultiheadAttention (num_heads kept unless the
    head width is kept: a thinned model drops either whole heads or channels of every head)."""
    bad = []
    if module._qkv_same_embed_dim:
        packed = shape("in_proj_weight")
        embed, kdim, vdim = packed[1], packed[1], packed[1]
        if packed[0] % 3:
            bad.append(f"in_proj_weight {packed} is not three stacked projections")
        inner = packed[0] // 3
    else:
        q, k, v = shape("q_proj_weight"), shape("k_proj_weight"), shape("v_proj_weight")
        embed, kdim, vdim, inner = q[1], k[1], v[1], q[0]
    heads = module.num_heads
    if inner != embed:
        bad.append(f"projections of width {inner} for embed_dim {embed} (nn.MultiheadAttention needs them equal)")
    if inner % heads:
        heads = inner // module.head_dim if inner % module.head_dim == 0 else heads
    if inner % heads:
        bad.append(f"width {inner} is not divisible into {module.num_heads} heads of any fixed width")
    same = kdim == embed and vdim == embed and module._qkv_same_embed_dim
    return {
        "embed_dim": embed,
        "kdim": kdim,
        "vdim": vdim,
        "num_heads": heads,
        "head_dim": inner // max(heads, 1),
        "_qkv_same_embed_dim": same,
    }, bad


def reshape_to(model: nn.Module, shapes: Mapping[str, Sequence[int]], *, where: str = "reshape_to") -> list[str]:
    """Resize the layers of ``model`` in place so that its state dict has the given tensor
    ``shapes`` (a thinned copy's); return the names of the resized modules.

    Linear, Conv (grouped and depthwise, transposed), BatchNorm, LayerNorm, weight-only norms
    (RMSNorm-like), Embedding, Hugging Face ``Conv1D`` and ``nn.MultiheadAttention`` are resized
    and their size attributes (``in_features``, ``out_channels``, ``groups`` of a depthwise conv,
    ``num_features``, ``normalized_shape``, ``embedding_dim``, ``nf``, ``embed_dim``/``head_dim``
    /``num_heads``, ...) updated. Every size is checked first, and nothing is changed when any
    is inconsistent, larger than the model's (thinning only shrinks) or a module of another kind
    would need resizing: a ``ModelFileError`` names them all. Whether the resized layers fit
    together (one layer's outputs, the next one's inputs) shows only when the model runs.
    Attributes that models keep outside these modules (e.g. a Hugging Face attention's
    ``num_heads``) are not changed here; :func:`load` restores them from the file's header
    (:data:`SIZE_ATTRIBUTES`).
    """
    own = model.state_dict()
    changed: dict[str, dict[str, tuple[int, ...]]] = {}
    grown: list[str] = []
    for name, shape in shapes.items():
        if name in own and tuple(own[name].shape) != tuple(shape):
            module_name, _, tensor = name.rpartition(".")
            changed.setdefault(module_name, {})[tensor] = tuple(int(d) for d in shape)
            if len(shape) != own[name].dim() or any(int(a) > b for a, b in zip(shape, own[name].shape)):
                grown.append(
                    f"tensor {name!r} has shape {tuple(shape)} in the file but {tuple(own[name].shape)} in the model"
                )
    if grown:
        raise ModelFileError(
            f"{where}: {'; '.join(grown)} (a thinned model is resized only to smaller sizes; "
            f"is this the model the file was saved from?)."
        )
    plans, problems = {}, []
    for module_name, local in changed.items():
        module = model.get_submodule(module_name)
        if any(d < 0 for s in local.values() for d in s):
            problems.append(f"{module_name or '(root)'}: negative size in {local}")
            continue
        attrs, bad = _size_checks(module, local)
        problems += [f"{module_name or '(root)'} ({type(module).__name__}): {b}" for b in bad]
        plans[module_name] = (module, attrs, local)
    if problems:
        raise ModelFileError(f"{where}: the stored shapes do not fit the given model: {'; '.join(problems)}.")
    for module, attrs, local in plans.values():
        _apply(module, attrs, local)
    return list(plans)


#: Integer size attributes that attention modules keep beside their tensors (nn.MultiheadAttention,
#: Hugging Face GPT-2 / BERT / LLaMA-style attention); a thinned model's are saved in the header
#: and restored by ``load(path, model=...)``, since the tensor shapes alone do not tell, e.g.,
#: fewer heads from narrower heads.
SIZE_ATTRIBUTES = (
    "num_heads",
    "n_head",
    "head_dim",
    "embed_dim",
    "kdim",
    "vdim",
    "split_size",
    "num_attention_heads",
    "attention_head_size",
    "all_head_size",
    "num_key_value_heads",
    "num_key_value_groups",
)


def size_attributes(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{module name: {attribute: value}}`` of the :data:`SIZE_ATTRIBUTES` the modules have."""
    out = {}
    for name, module in model.named_modules():
        found = {a: getattr(module, a) for a in SIZE_ATTRIBUTES if type(getattr(module, a, None)) is int}
        if found:
            out[name] = found
    return out


def _set_sizes(model: nn.Module, sizes: dict, where: str) -> None:
    """Give the modules the saved size attributes (only those they already have as ints)."""
    _expect(isinstance(sizes, dict), where, "a 'sizes' entry that is not a mapping")
    modules = dict(model.named_modules())
    for name, attrs in sizes.items():
        module = modules.get(name)
        if module is None or not isinstance(attrs, dict):
            continue
        for attr, value in attrs.items():
            if attr in SIZE_ATTRIBUTES and type(getattr(module, attr, None)) is int:
                _expect(type(value) is int and value >= 1, where, f"{name}.{attr} = {value!r}")
                setattr(module, attr, value)


def _apply(module: nn.Module, attrs: dict, local: dict[str, tuple[int, ...]]) -> None:
    """Give ``module`` empty tensors of the new shapes (filled by load_state_dict) and its new sizes."""
    for attr, value in attrs.items():
        setattr(module, attr, value)
    for tensor_name, shape in local.items():
        old = getattr(module, tensor_name)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(module, tensor_name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            module.register_buffer(tensor_name, new, persistent=tensor_name not in module._non_persistent_buffers_set)


# --------------------------------------------------------------------------- ONNX

EXPORTERS = ("auto", "torchscript", "dynamo")


class _FlatLogits(nn.Module):
    """``model`` called with its inputs as flat positional tensors, returning only its logits
    (a tensor, the first element of a tuple or the ``output_key`` entry of a dict/ModelOutput).
    ONNX graphs take and return plain tensors; a Hugging Face cache object cannot be an output."""

    def __init__(self, model: nn.Module, n_args: int, keys: list[str], output_key: str | None):
        super().__init__()
        self.model, self.n_args, self.keys, self.output_key = model, n_args, keys, output_key

    def forward(self, *tensors):
        from prunelab.inputs import logits_of

        args, kwargs = tensors[: self.n_args], dict(zip(self.keys, tensors[self.n_args :]))
        return logits_of(self.model(*args, **kwargs), self.output_key, where="export_onnx")


def _input_names(batch) -> list[str]:
    if batch.kwargs:
        positional = [f"input{i}" for i in range(len(batch.args))]
        return positional + list(batch.kwargs)
    return ["input"] if len(batch.args) == 1 else [f"input{i}" for i in range(len(batch.args))]


def _export_with(
    exporter: str, net: nn.Module, tensors: tuple, path: Path, names: list[str], opset: int | None
) -> None:
    axes = {name: {0: "batch"} for name in [*names, "logits"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation and progress notices
        if exporter == "torchscript":
            torch.onnx.export(
                net,
                tensors,
                str(path),
                dynamo=False,
                input_names=names,
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=opset,
            )
            return
        import contextlib
        import io

        auto = torch.export.Dim.AUTO
        shapes = tuple({0: auto} if t.dim() > 0 else None for t in tensors)
        with contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter prints its steps
            torch.onnx.export(
                net,
                tensors,
                str(path),
                dynamo=True,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes=(shapes,),
                opset_version=opset,
                verbose=False,
            )


def _check_onnx(path: Path, net: nn.Module, tensors: tuple, names: list[str], where: str) -> float | None:
    """Largest difference between onnxruntime's output and the model's on the example
    (None without onnxruntime); a ValueError when they disagree."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors) if n in wanted}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        ref = net.eval()(*tensors).detach().cpu()
    if got.shape != ref.shape:
        raise ValueError(
            f"{where}: the ONNX file gives an output of shape {tuple(got.shape)}, the model "
            f"{tuple(ref.shape)}; the export is wrong, not written."
        )
    diff = float((got.to(ref.dtype) - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    if not diff <= 1e-4 * max(1.0, scale):
        raise ValueError(
            f"{where}: onnxruntime's output differs from the model's by {diff:.3g} "
            f"(largest |output| {scale:.3g}); the export is wrong, not written."
        )
    return diff


@validate_params(
    {
        "model": [MODEL],
        "path": [PATH],
        "input_shape": [SHAPE, None],
        "opset": [Interval(Integral, 7, 99), None],
        "exporter": [STR],
        "output_key": [STR, None],
        "check": [bool],
    }
)
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
    *,
    example_inputs=None,
    opset: int | None = None,
    exporter: str = "auto",
    output_key: str | None = None,
    check: bool = True,
) -> Path:
    """Write ``model`` (typically thinned) as ONNX, with a dynamic batch dimension.

    The graph's inputs are the model's: one tensor named ``input`` (from ``input_shape``, a
    float tensor of shape ``(1, *input_shape)``), or the tensors of ``example_inputs`` (a
    tensor, a tuple of positional inputs named ``input0``, ``input1``, ... or a dict of keyword
    inputs under their own names, e.g. ``input_ids``, ``attention_mask``). Its one output,
    ``logits``, is the model's output tensor, the first element of a tuple output, or the
    ``logits`` (or ``output_key``) entry of a dict / Hugging Face ``ModelOutput`` (caches and
    other entries are dropped).

    Args:
        exporter: ``"torchscript"`` (PyTorch's TorchScript exporter, needs only ``onnx``),
            ``"dynamo"`` (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``; it
            exports models that tracing cannot, e.g. Hugging Face GPT-2 and LLaMA) or
            ``"auto"``: TorchScript, and dynamo if that fails and ``onnxscript`` is installed.
        check: run the written file with ``onnxruntime`` (when installed) on the example and
            compare with the model's output (to 1e-4 of its largest value); a mismatch counts
            as that exporter's failure (``"auto"`` then tries the next one), and the file is removed.

    Needs the ``onnx`` package (``pip install 'prunelab[onnx]'``, which also brings
    ``onnxruntime`` and ``onnxscript``).

    Raises:
        ValueError: not exactly one of ``input_shape``/``example_inputs``, an unknown
            ``exporter``, a model that no exporter can export (the message carries each
            exporter's error), or an export whose output differs from the model's.
    """
    from prunelab.inputs import example_batch

    where = "export_onnx"
    check_materialised(model, where)
    if exporter not in EXPORTERS:
        raise ValueError(
            f"{where}: unknown exporter {exporter!r}{suggest(exporter, EXPORTERS)}; "
            f"valid exporters: {', '.join(EXPORTERS)}."
        )
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ImportError("export_onnx needs the onnx package: pip install 'prunelab[onnx]'.")
    has_dynamo = importlib.util.find_spec("onnxscript") is not None
    if exporter == "dynamo" and not has_dynamo:
        raise ImportError("export_onnx(exporter='dynamo') needs the onnxscript package: pip install 'prunelab[onnx]'.")
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else None
    batch = example_batch(model, input_shape, example_inputs, where=where, dtype=dtype).to(device="cpu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = _input_names(batch)
    net = _FlatLogits(copy.deepcopy(model).cpu(), len(batch.args), list(batch.kwargs), output_key).eval()
    tensors = tuple(batch.args) + tuple(batch.kwargs.values())
    if not all(torch.is_tensor(t) for t in tensors):
        raise TypeError(f"{where}: every example input must be a tensor (ONNX graphs take tensors only).")
    order = {"auto": ["torchscript", "dynamo"] if has_dynamo else ["torchscript"]}.get(exporter, [exporter])
    errors = []
    for name in order:
        try:
            _export_with(name, net, tensors, path, names, opset)
            if check:
                _check_onnx(path, net, tensors, names, where)
        except Exception as err:  # each exporter's own failure, reported together below
            path.unlink(missing_ok=True)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            errors.append(f"{name}: {type(err).__name__}: {first[:300]}")
            continue
        return path
    hint = "" if has_dynamo or exporter != "auto" else " (install onnxscript to try torch's dynamo exporter too)"
    raise ValueError(f"{where}: {type(model).__name__} could not be exported to ONNX{hint}. " + "; ".join(errors))
