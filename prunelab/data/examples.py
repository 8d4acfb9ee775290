"""The one example input that a dataset gives a dry run (summary, FLOPs, latency, unit tracing).

Image and feature datasets are described by their ``input_shape``: the dry runs build a zero float
input ``(1, *input_shape)`` themselves. A language model refuses a float tensor (its inputs are token
ids), so a dataset of integer inputs — a :class:`~prunelab.data.TextDataset` — gives its first
training sequence as ``example_inputs`` instead: the dataset's dtype, ids in its vocabulary.

>>> stats = summary(model, **dry_run_inputs(ds))        # the same call for an image or a text dataset
"""

from __future__ import annotations

from typing import Any

import torch


def takes_token_ids(ds: Any) -> bool:
    """Whether ``ds``'s inputs are integer ids (a text dataset) rather than float tensors."""
    x = getattr(ds, "x_train", None)
    return torch.is_tensor(x) and not x.dtype.is_floating_point and not x.dtype.is_complex


def dry_run_inputs(ds: Any) -> dict[str, Any]:
    """Keyword arguments describing one input of ``ds`` to ``summary``, ``count_flops``,
    ``measure_latency``, ``inference_latency``, ``Units.of`` and ``thin_dead_units``:
    ``{"input_shape": ds.input_shape}`` for float inputs (unchanged from passing the shape), or
    ``{"example_inputs": ds.x_train[:1]}`` (one sequence of token ids) for integer inputs."""
    if takes_token_ids(ds):
        return {"example_inputs": ds.x_train[:1].clone()}
    return {"input_shape": tuple(ds.input_shape)}


def token_example(seq_len: int) -> torch.Tensor:
    """A stand-in sequence of token ids ``(1, seq_len)`` (all id 0) for a dry run before the data is
    loaded (a spec's validation)."""
    return torch.zeros((1, int(seq_len)), dtype=torch.int64)
