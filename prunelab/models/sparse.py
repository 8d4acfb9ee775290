"""The CSR sparse Linear layer, :class:`SparseLinear`: a Linear layer whose weight keeps only its
non-zeros, in compressed sparse row (CSR) form, for inference (docs/methods.md §6).

It lives with the other layers (:mod:`prunelab.models.hashed` holds the hashed ones), so that
:mod:`prunelab.metrics` counts it without importing the tools that make it:
:func:`prunelab.sparse.sparsify` replaces the sparse ``nn.Linear`` layers of a model by it and
:func:`prunelab.sparse.densify` turns it back; ``from prunelab.sparse import SparseLinear`` works too.

**Which kernel.** The forward pass picks one of three torch kernels by the number of input rows
``n`` (the product of the input's leading dimensions). Measured on the 2-core development machine
(AVX-512, MKL, torch 2.13, one thread, both cores also busy with a background job, so the figures
are noisy; ``python benchmarks/sparse.py --formulations``), median µs per call of each candidate
alone for a 784→300 layer at 95 % sparsity:

==========================================  ========  =========
formulation                                 batch 1   batch 64
==========================================  ========  =========
dense ``F.linear`` (zeros kept)               19.6      336.5
CSR int64 indices, ``addmm(b, W, xᵀ)ᵀ``       16.8      108.3
CSR int32 indices, ``addmm(b, W, xᵀ)ᵀ``       13.5      103.8
CSR int32 indices, ``addmv(b, W, x)``          7.6        —
``embedding_bag`` over the CSR arrays         57.3       65.8
COO ``addmm(b, W, xᵀ)ᵀ``                     341.7      601.6
CSC ``addmm(b, W, xᵀ)ᵀ``                     808.7      870.1
``x @ Wᵀ`` with Wᵀ in CSR                    718.9     1442.3
==========================================  ========  =========

So: int32 indices (2–5 µs faster than int64 ones per call here, presumably because MKL's usual
32-bit interface needs a conversion of int64 indices), ``addmv`` for one row,
``addmm`` with the CSR matrix on the left for a few rows, and from :data:`MANY_ROWS` = 32 rows
on ``embedding_bag``, which computes exactly a CSR product: bag ``i`` sums
``values[k] · xᵀ[col[k]]`` over ``k`` in ``crow[i]:crow[i+1]``. It overtook ``addmm`` from about
32 rows in a sweep of batch sizes 2–256 (at 90 %: 75 vs 99 µs at 32 rows, 116 vs 195 at 64). The
CSR tensor is built once from the stored arrays and cached. Whether the sparse layer beats the
dense one depends on the machine, the thread count, the layer's shape and its sparsity, which is
why :func:`prunelab.sparse.sparsify` measures each layer before replacing it. ``docs/sparse.md``
has the tables.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from numbers import Integral
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F

from prunelab._validation import MAX_UNITS, TENSOR, Interval, check_type, validate_params

__all__ = ["MANY_ROWS", "SUPPORTED_DTYPES", "SparseLinear", "check_dtype"]

#: From this many input rows on, the forward pass uses ``embedding_bag`` instead of ``addmm``.
MANY_ROWS = 32

#: Value dtypes the CPU kernels support (MKL's sparse ``addmm``/``addmv``: float and double).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _index_dtype(n: int) -> torch.dtype:
    """int32 indices (faster with MKL than int64 ones, see above) unless ``n`` does not fit."""
    return torch.int32 if n < 2**31 else torch.int64


_FEATURES = Interval(Integral, 1, MAX_UNITS)


class SparseLinear(nn.Module):
    """A Linear layer ``y = x Wᵀ + b`` whose weight is stored in CSR form; for inference only.

    Build it with :meth:`from_linear` and go back with :meth:`to_linear` (both exact). Like
    ``nn.Linear`` it takes any input ``(..., in_features)`` and returns ``(..., out_features)``
    (contiguous). Its state is four plain tensors, saved in the state dict: the CSR arrays
    ``crow_indices`` (``out_features + 1``), ``col_indices`` and ``values`` (one per non-zero),
    and ``bias`` (or None). They are buffers, not parameters: no optimiser updates them and no
    gradient reaches them. :attr:`weight` is the ``torch.sparse_csr`` tensor built on them (cached;
    sharing their memory). Loading a state dict accepts any number of non-zeros.

    Keeping the arrays rather than the CSR tensor itself keeps the module an ordinary one:
    ``copy.deepcopy`` cannot copy a sparse CSR tensor (torch 2.13), while plain tensors deep-copy,
    pickle and load with ``torch.load(weights_only=True)``.
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None

    @validate_params(
        {
            "in_features": [_FEATURES],
            "out_features": [_FEATURES],
            "crow_indices": [TENSOR],
            "col_indices": [TENSOR],
            "values": [TENSOR],
            "bias": [TENSOR, None],
        }
    )
    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: torch.Tensor,
        col_indices: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        where = "SparseLinear"
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias is not None:
            if tuple(bias.shape) != (out_features,):
                raise ValueError(
                    f"the 'bias' parameter of {where} must have shape ({out_features},). "
                    f"Got shape {tuple(bias.shape)} instead."
                )
        check_dtype(values.dtype, where)
        index_dtype = _index_dtype(max(len(values), in_features))
        self.register_buffer("crow_indices", crow_indices.to(index_dtype))
        self.register_buffer("col_indices", col_indices.to(index_dtype))
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)
        self._csr_cache: tuple | None = None
        _ = self.weight  # build and check the CSR tensor now, so bad arrays fail here

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """The same layer with its weight in CSR form: exact zeros are dropped, all other values
        are copied bit for bit (as is the bias), on the same device and with the same dtype."""
        check_type("linear", linear, nn.Linear, where="SparseLinear.from_linear")
        check_dtype(linear.weight.dtype, "SparseLinear.from_linear")
        with torch.no_grad(), _quiet_beta_warning():
            csr = linear.weight.detach().to_sparse_csr()
            bias = None if linear.bias is None else linear.bias.detach().clone()
            return cls(
                linear.in_features,
                linear.out_features,
                csr.crow_indices().clone(),
                csr.col_indices().clone(),
                csr.values().clone(),
                bias,
            )

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense weight (zeros where nothing is stored) and the bias."""
        values = self.values
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=values.device, dtype=values.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight as a ``torch.sparse_csr`` tensor."""
        # read on every forward call: the fast path avoids nn.Module.__getattr__
        buffers, cache = self._buffers, self._csr_cache
        arrays = cast(  # registered in __init__ and replaced only by tensors: never None
            "tuple[torch.Tensor, torch.Tensor, torch.Tensor]",
            (buffers["crow_indices"], buffers["col_indices"], buffers["values"]),
        )
        if cache is not None and cache[0] is arrays[0] and cache[1] is arrays[1] and cache[2] is arrays[2]:
            return cache[3]
        # first use, or .to()/.double()/load_state_dict replaced the arrays: check them once, as a
        # CSR tensor with bad indices makes the kernels read out of bounds
        check_dtype(arrays[2].dtype, "SparseLinear")
        with _quiet_beta_warning(), torch.inference_mode(False):
            try:
                csr = torch.sparse_csr_tensor(*arrays, (self.out_features, self.in_features), check_invariants=True)
            except RuntimeError as err:
                raise ValueError(
                    f"SparseLinear({self.in_features}, {self.out_features}) has inconsistent CSR arrays: {err}"
                ) from err
        self._csr_cache = (*arrays, csr)
        return csr

    @property
    def nnz(self) -> int:
        """Number of stored weights (the non-zeros, for a layer made by :meth:`from_linear`)."""
        return len(self.values)

    @property
    def sparsity(self) -> float:
        """Fraction of the ``in × out`` weights that are zero."""
        return 1.0 - int(torch.count_nonzero(self.values.detach()).item()) / (self.in_features * self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The weight as an ordinary dense ``(out_features, in_features)`` tensor."""
        return self.weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            # reshape(-1, in_features) below would accept any input of a fitting size
            raise ValueError(
                f"SparseLinear({self.in_features}, {self.out_features}) takes inputs of shape "
                f"(..., {self.in_features}). Got shape {tuple(x.shape)} instead."
            )
        weight, bias = self.weight, self._buffers["bias"]
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        if n == 1:
            y = torch.mv(weight, rows[0]) if bias is None else torch.addmv(bias, weight, rows[0])
        elif n < MANY_ROWS:
            y = torch.mm(weight, rows.t()) if bias is None else torch.addmm(bias[:, None], weight, rows.t())
            y = y.t().contiguous()
        else:
            # bag i = sum over k in crow[i]:crow[i+1] of values[k] * rowsᵀ[col[k]]: row i of W·rowsᵀ
            y = F.embedding_bag(
                self.col_indices,
                rows.t().contiguous(),
                self.crow_indices,
                mode="sum",
                per_sample_weights=self.values,
                include_last_offset=True,
            )
            y = y.t().contiguous()
            if bias is not None:
                y = y.add_(bias)
        return y.reshape(*lead, self.out_features)

    def __getstate__(self) -> dict:
        # the cached CSR tensor cannot be deep-copied; it is rebuilt from the arrays on first use
        state = super().__getstate__()
        state["_csr_cache"] = None
        return state

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # the number of non-zeros is data, not architecture: make room for the saved arrays
        for name in ("col_indices", "values"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(saved, torch.Tensor) and saved.dim() == 1 and saved.shape != current.shape:
                setattr(self, name, current.new_empty(saved.shape))
        errors_before = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._csr_cache = None
        if len(error_msgs) == errors_before:
            _ = self.weight  # check the loaded arrays now rather than at the first forward call

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"sparsity={self.sparsity:.4f}, bias={self.bias is not None}"
        )


@contextlib.contextmanager
def _quiet_beta_warning() -> Iterator[None]:
    """Silence torch's "Sparse CSR tensor support is in beta" warning (the CSR operations used
    here are tested)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def check_dtype(dtype: torch.dtype, where: str) -> None:
    """Refuse value dtypes the CPU sparse kernels do not support (:data:`SUPPORTED_DTYPES`)."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{where} needs float32 or float64 weights (torch's CPU sparse kernels); "
            f"got {dtype}. Convert the layer first, e.g. linear.float()."
        )
