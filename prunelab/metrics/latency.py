"""Measured inference latency of a model (docs/methods.md §6: report it next to the theoretical speedup).

    from prunelab import measure_latency
    for row in measure_latency(model, (1, 28, 28), batch_sizes=(1, 64), threads=1):
        print(row)

What is timed is one forward call ``model(x)`` on an input that already lies on
the model's device, in eval mode and under ``torch.inference_mode()``; nothing
else. The figures are medians because latency on a shared machine is skewed to
the right: a few calls are slowed down by the scheduler, other processes or the
allocator, and the median ignores them while the mean does not. ``docs/latency.md``
explains how to read the numbers (above all: say how many threads were used).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import cast

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab._validation import MAX_BATCH, MAX_REPEATS, THREADS, Constraint, Interval, Sizes, validate_params
from prunelab.metrics.dry_run import DRY_PARAMS, DryInput, on_device, resolve_dry_input

_WHERE = "measure_latency"


@dataclass(frozen=True)
class Latency:
    """Forward-pass latency of one batch size; times in milliseconds over ``repeats`` timed calls.

    * ``median_ms``, ``p10_ms``, ``p90_ms``: percentiles of the per-call times
      (linear interpolation between order statistics, as ``numpy.percentile``).
    * ``mean_ms``: their mean (pulled up by stalls; prefer the median).
    * ``per_sample_us = 1000 · median_ms / batch_size``.
    * ``threads``: torch's intra-op thread count during the measurement.
    * ``device``: where the input and the model lived, e.g. ``"cpu"`` or ``"cuda:0"``.
    """

    batch_size: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    per_sample_us: float
    repeats: int
    threads: int
    device: str

    def __str__(self) -> str:
        return (
            f"batch {self.batch_size:>4}: median {self.median_ms:.3f} ms "
            f"(p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, mean {self.mean_ms:.3f}), "
            f"{self.per_sample_us:.2f} us/sample; {self.repeats} calls, "
            f"{self.threads} thread(s), {self.device}"
        )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (``q`` in [0, 1]) of non-empty sorted values, interpolating linearly."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _check_batch_sizes(batch_sizes: object) -> tuple[int, ...]:
    """The declared batch sizes as a tuple of ints (checked by the declaration)."""
    if isinstance(batch_sizes, Integral):
        return (int(batch_sizes),)
    return tuple(int(b) for b in cast(Sequence[int], batch_sizes))  # a sequence: checked by Sizes


def _make_batch(dry: DryInput, batch_size: int, generator: torch.Generator):
    """The timed batch: for ``input_shape``, standard-normal values drawn on the CPU (reproducible
    on every device), then moved; for ``example_inputs``, its first sample repeated."""
    from prunelab.inputs import Batch

    if dry.from_example:
        return dry.batch.repeat_to(batch_size)
    x = torch.randn((batch_size, *dry.shape), generator=generator)
    return Batch((on_device(lambda: x.to(device=dry.device, dtype=dry.dtype), dry.device, _WHERE),))


def _time_calls(model: nn.Module, batch, warmup: int, repeats: int, min_seconds: float, sync) -> list[float]:
    """Seconds of each timed call: ``warmup`` untimed calls, then at least ``repeats`` timed ones,
    more until ``min_seconds`` have been measured."""
    for _ in range(warmup):
        batch.call(model)
    sync()
    times: list[float] = []
    measured = 0.0
    while len(times) < repeats or measured < min_seconds:
        start = time.perf_counter()
        batch.call(model)
        sync()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        measured += elapsed
    return times


def _failure(model: nn.Module, dry: DryInput, batch_size: int) -> str:
    if dry.from_example:
        return (
            f"{_WHERE} could not run {type(model).__name__} on {dry.describe(batch_size)}; check the "
            f"'example_inputs' parameter (a tensor, tuple or dict the model takes) and the device."
        )
    return (
        f"{_WHERE} could not run {type(model).__name__} on an input of shape "
        f"{(batch_size, *dry.shape)} (input_shape={dry.shape} plus a batch of {batch_size}, "
        f"dtype={dry.dtype}, device={dry.device}); check the 'input_shape' parameter "
        f"(one input, without the batch dimension) and the device."
    )


def _summarise(batch_size: int, times: list[float], threads: int, device: torch.device) -> Latency:
    ms = sorted(t * 1e3 for t in times)
    median = percentile(ms, 0.5)
    return Latency(
        batch_size=batch_size,
        median_ms=median,
        p10_ms=percentile(ms, 0.1),
        p90_ms=percentile(ms, 0.9),
        mean_ms=sum(ms) / len(ms),
        per_sample_us=1e3 * median / batch_size,
        repeats=len(ms),
        threads=threads,
        device=str(device),
    )


#: The longest a measurement may be asked to go on (``min_seconds``).
MAX_SECONDS = 3600.0
#: What measure_latency and the functions that time models declare.
TIMING: dict[str, list[Constraint | None]] = {
    "batch_sizes": [Sizes(MAX_BATCH)],
    "warmup": [Interval(Integral, 0, MAX_REPEATS)],
    "repeats": [Interval(Integral, 1, MAX_REPEATS)],
    "threads": [THREADS, None],
}


@validate_params({**DRY_PARAMS, **TIMING, "min_seconds": [Interval(Real, 0, MAX_SECONDS)]})
def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int] | int | None = None,
    batch_sizes: Sequence[int] | int = (1, 64),
    *,
    example_inputs=None,
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
    device: torch.device | str | None = None,
    min_seconds: float = 0.0,
) -> list[Latency]:
    """Median forward latency of ``model`` at each batch size, one :class:`Latency` per batch size.

    For each batch size an input batch is made once on ``device`` (default: the model's; the
    model is not moved): with ``input_shape``, random values of shape ``(batch, *input_shape)``
    in the dtype of the model's first float parameter; with ``example_inputs`` (a tensor, a
    tuple of positional inputs or a dict of keyword inputs such as ``input_ids`` /
    ``attention_mask`` / ``pixel_values``, batch dimension first), the example's first sample
    repeated to the batch size, floating-point tensors cast to the model's dtype and integer
    ones (token ids) kept. Exactly one of the two. Then ``warmup`` untimed calls and
    ``repeats`` timed calls of the model on it, each timed alone with ``time.perf_counter``.
    With ``min_seconds > 0`` the timed calls go on until that much time has been measured.

    **Timed:** the forward call only. On CUDA the device is synchronised before the
    clock starts and before it stops, so the time covers the kernels, not just their
    launch. **Not timed:** making the input, moving data between devices (there is
    none: input and model are already on the device), autograd (everything runs under
    ``torch.inference_mode()``, so no graph is recorded), the warm-up calls.

    **Why medians:** per-call times on a shared machine have a long right tail (the
    scheduler, other processes, the allocator, lazy initialisation). The median and
    the 10th/90th percentiles describe the typical call and its spread without being
    dragged by a few stalls; the mean is reported too, for comparison.

    Args:
        model: any ``nn.Module``; it runs in eval mode and every module's train/eval
            flag is restored afterwards.
        input_shape: ONE input without the batch dimension, e.g. ``(1, 28, 28)``.
        batch_sizes: positive ints (or one int), measured in this order.
        example_inputs: instead of ``input_shape``, inputs as the model takes them.
        warmup: untimed calls before timing, an int ≥ 0.
        repeats: timed calls, an int ≥ 1 (the minimum with ``min_seconds``).
        threads: torch intra-op threads for the measurement (``torch.set_num_threads``),
            restored afterwards; default: leave torch's current setting. **CPU latency
            depends strongly on it: always report it** (``Latency.threads``).
        device: where the input is made; default: the device of the model's parameters.
        min_seconds: keep timing until at least this many seconds were measured, ≥ 0.

    Raises:
        ValueError: a bad value, both or neither of ``input_shape`` and ``example_inputs``, or a
            forward pass that fails (the message names the input and carries the model's error).
        TypeError: arguments of the wrong type.
    """
    dry = resolve_dry_input(model, input_shape, example_inputs, device, None, _WHERE)
    device = dry.device
    sizes = _check_batch_sizes(batch_sizes)
    from prunelab._model_checks import check_materialised

    check_materialised(model, _WHERE)
    warmup, repeats, min_seconds = int(warmup), int(repeats), float(min_seconds)
    threads = None if threads is None else int(threads)

    if device.type == "cuda":

        def sync() -> None:
            torch.cuda.synchronize(device)
    else:

        def sync() -> None:
            pass

    previous_threads = torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    results = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        with eval_mode(model), torch.inference_mode():
            for batch_size in sizes:
                batch = _make_batch(dry, batch_size, generator)
                try:
                    times = _time_calls(model, batch, warmup, repeats, min_seconds, sync)
                except Exception as err:
                    raise ValueError(
                        f"{_failure(model, dry, batch_size)} The model raised {type(err).__name__}: {err}"
                    ) from err
                results.append(_summarise(batch_size, times, used_threads, device))
    finally:
        if torch.get_num_threads() != previous_threads:
            torch.set_num_threads(previous_threads)
    return results
