"""Tests of prunelab.measure_latency: invariants only, no speed-up is asserted (see benchmarks/thinning.py
and benchmarks/latency_scaling.py)."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

import prunelab
from prunelab.metrics import Latency, measure_latency
from prunelab.metrics.latency import percentile


class Recorder(nn.Module):
    """Linear(4, 2) that records every call: input shape and dtype, train flag, inference mode."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.fc = nn.Linear(4, 2).to(dtype)
        self.drop = nn.Dropout(0.5)
        self.calls: list[tuple] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(
            (tuple(x.shape), x.dtype, self.training, self.drop.training, torch.is_inference_mode_enabled())
        )
        return self.drop(self.fc(x))


class Sleeper(nn.Module):
    """Sleeps 1 ms per call, so a time budget needs a known number of calls."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.001)
        return self.fc(x)


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom from the model")


# --------------------------------------------------------------------------- results


def test_one_result_per_batch_size_in_order_with_all_fields():
    results = measure_latency(Recorder(), (4,), batch_sizes=(1, 3, 5), warmup=1, repeats=4)
    assert [r.batch_size for r in results] == [1, 3, 5]
    for r in results:
        assert isinstance(r, Latency)
        assert {f.name for f in dataclasses.fields(r)} == {
            "batch_size",
            "median_ms",
            "p10_ms",
            "p90_ms",
            "mean_ms",
            "per_sample_us",
            "repeats",
            "threads",
            "device",
        }
        assert r.repeats == 4
        assert r.device == "cpu"
        assert r.threads == torch.get_num_threads()
        assert r.per_sample_us == pytest.approx(1000 * r.median_ms / r.batch_size)
        assert 0 < r.p10_ms <= r.median_ms <= r.p90_ms
        assert r.mean_ms > 0
    assert "batch" in str(results[0]) and "thread" in str(results[0])


def test_single_int_batch_size():
    (result,) = measure_latency(Recorder(), (4,), batch_sizes=7, warmup=0, repeats=2)
    assert result.batch_size == 7


def test_latency_is_frozen():
    (result,) = measure_latency(Recorder(), (4,), batch_sizes=(1,), warmup=0, repeats=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.median_ms = 0.0


def test_exported_at_top_level():
    assert prunelab.measure_latency is measure_latency
    assert "measure_latency" in prunelab.__all__


@pytest.mark.parametrize("n", [1, 2, 5, 10, 11])
def test_percentile_matches_numpy(n):
    values = sorted(np.random.default_rng(n).exponential(size=n).tolist())
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, 100 * q)))


# --------------------------------------------------------------------------- what is called


def test_warmup_and_repeats_calls_with_input_shape_and_dtype_of_the_model():
    model = Recorder(torch.float64)
    measure_latency(model, (4,), batch_sizes=(2, 6), warmup=3, repeats=5)
    assert len(model.calls) == 2 * (3 + 5)
    assert [c[0] for c in model.calls] == [(2, 4)] * 8 + [(6, 4)] * 8
    assert all(c[1] == torch.float64 for c in model.calls)


def test_runs_in_eval_and_inference_mode_and_restores_every_flag():
    model = Recorder()
    model.train()
    model.drop.eval()  # a mixed state must come back exactly
    measure_latency(model, (4,), batch_sizes=(1,), warmup=1, repeats=2)
    assert all(
        not training and not drop_training and inference for _, _, training, drop_training, inference in model.calls
    )
    assert model.training and model.fc.training and not model.drop.training


def test_min_seconds_keeps_timing_until_the_budget_is_measured():
    (result,) = measure_latency(Sleeper(), (2,), batch_sizes=(1,), warmup=0, repeats=1, min_seconds=0.03)
    assert result.repeats > 1
    assert result.repeats * result.mean_ms >= 30


# --------------------------------------------------------------------------- threads


def test_threads_are_set_for_the_measurement_and_restored():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        (result,) = measure_latency(Recorder(), (4,), batch_sizes=(1,), warmup=0, repeats=1, threads=1)
        assert result.threads == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_and_modes_are_restored_when_the_forward_fails():
    before = torch.get_num_threads()
    model = Failing()
    model.train()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError):
            measure_latency(model, (2,), warmup=0, repeats=1, threads=1)
        assert torch.get_num_threads() == 2
        assert model.training and model.fc.training
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- bad input


def test_a_failing_forward_names_input_shape_and_the_model_error():
    with pytest.raises(ValueError, match=r"'input_shape'.*RuntimeError: boom from the model"):
        measure_latency(Failing(), (2,), warmup=0, repeats=1)
    with pytest.raises(ValueError, match=r"input_shape=\(5,\).*mat1 and mat2"):
        measure_latency(nn.Linear(4, 2), (5,), warmup=0, repeats=1)


@pytest.mark.parametrize(
    "param, value, error",
    [
        ("model", "not a model", TypeError),
        ("input_shape", (0,), ValueError),
        ("input_shape", (4, -1), ValueError),
        ("input_shape", "4", ValueError),
        ("input_shape", (4.0,), ValueError),
        ("batch_sizes", (), ValueError),
        ("batch_sizes", (1, 0), ValueError),
        ("batch_sizes", (1.5,), ValueError),
        ("batch_sizes", (True,), ValueError),
        ("batch_sizes", "64", TypeError),
        ("batch_sizes", None, TypeError),
        ("warmup", -1, ValueError),
        ("warmup", 1.5, TypeError),
        ("repeats", 0, ValueError),
        ("repeats", "50", TypeError),
        ("threads", 0, ValueError),
        ("threads", 1.0, TypeError),
        ("device", "no-such-device", ValueError),
        ("device", 3.5, TypeError),
        ("min_seconds", -0.1, ValueError),
        ("min_seconds", math.nan, ValueError),
        ("min_seconds", math.inf, ValueError),
        ("min_seconds", "1", TypeError),
    ],
)
def test_bad_arguments_raise_naming_the_parameter(param, value, error):
    kwargs = {"model": Recorder(), "input_shape": (4,), "batch_sizes": (1,), "warmup": 0, "repeats": 1}
    kwargs[param] = value
    with pytest.raises(error, match=f"'{param}' parameter of measure_latency"):
        measure_latency(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_an_absent_device_is_named():
    with pytest.raises(ValueError, match="'device' parameter of measure_latency.*'cuda'"):
        measure_latency(Recorder(), (4,), device="cuda", warmup=0, repeats=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measurement_reports_the_device():
    model = Recorder().cuda()
    (result,) = measure_latency(model, (4,), batch_sizes=(8,), warmup=1, repeats=3)
    assert result.device.startswith("cuda")
    assert 0 < result.p10_ms <= result.median_ms <= result.p90_ms


# --------------------------------------------------------------------------- example inputs


class TokenModel(nn.Module):
    """Embedding + Linear taking keyword inputs; records every call's input shapes and dtypes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, scale=None):
        self.calls.append({"ids": input_ids.clone(), "mask": attention_mask.clone(), "scale": scale})
        return self.fc(self.embed(input_ids) * attention_mask[..., None].to(torch.float32))


def test_keyword_example_inputs_repeat_the_first_sample_and_keep_integer_dtypes():
    model = TokenModel()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    example = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]), "scale": 2.0}
    results = measure_latency(model, example_inputs=example, batch_sizes=(1, 3), warmup=1, repeats=2)
    assert [r.batch_size for r in results] == [1, 3]
    assert len(model.calls) == 2 * (1 + 2)
    for call, size in zip(model.calls, [1] * 3 + [3] * 3):
        assert call["ids"].dtype == torch.long and call["mask"].dtype == torch.long
        assert torch.equal(call["ids"], ids[:1].expand(size, 3))  # the first sample, repeated
        assert torch.equal(call["mask"], torch.tensor([[1, 1, 0]] * size))
        assert call["scale"] == 2.0  # non-tensors pass as they are


def test_positional_example_inputs_are_cast_to_the_model_dtype():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2).double()
            self.seen: list[tuple] = []

        def forward(self, x, offset):
            self.seen.append((tuple(x.shape), x.dtype, offset.dtype))
            return self.fc(x) + offset

    model = Two()
    example = (torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.float32))
    measure_latency(model, example_inputs=example, batch_sizes=(2,), warmup=0, repeats=1)
    assert model.seen == [((2, 3), torch.float64, torch.float64)]


def test_input_shape_path_feeds_the_same_random_inputs_as_before():
    model = Recorder()
    seen = []
    model.fc.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    measure_latency(model, (4,), batch_sizes=(2, 3), warmup=0, repeats=2)
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(2, 4, generator=generator), torch.randn(3, 4, generator=generator)
    assert all(torch.equal(x, first) for x in seen[:2]) and all(torch.equal(x, second) for x in seen[2:])


def test_exactly_one_of_input_shape_and_example_inputs():
    with pytest.raises(ValueError, match="exactly one of 'input_shape'.*'example_inputs'.*Got both"):
        measure_latency(Recorder(), (4,), example_inputs=torch.ones(1, 4), warmup=0, repeats=1)
    with pytest.raises(ValueError, match="'input_shape' parameter of measure_latency.*example_inputs.*Got None"):
        measure_latency(Recorder(), warmup=0, repeats=1)
    with pytest.raises(TypeError, match="'example_inputs' parameter of measure_latency"):
        measure_latency(Recorder(), example_inputs="tokens", warmup=0, repeats=1)


def test_a_failing_forward_on_example_inputs_names_them_and_the_model_error():
    with pytest.raises(ValueError, match=r"example_inputs \(5,\).*batch of 2.*'example_inputs'.*mat1 and mat2"):
        measure_latency(nn.Linear(4, 2), example_inputs=torch.ones(1, 5), batch_sizes=(2,), warmup=0, repeats=1)
