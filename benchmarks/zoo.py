"""The zoo benchmark (issue 16): prunelab's methods on every model of the test zoo, in one table.

For each model of ``tests/zoo.py`` (ResNet-18-style, MobileNetV2-style, ``nn.TransformerEncoder``,
LSTM/GRU language models, Hugging Face GPT-2, BERT, ViT, LLaMA; tiny widths, random weights),
with calibration batches in the model's own form:

* **Cost of the methods at 50 %**: seconds and peak memory of ``prune(model, 0.5,
  criterion=c, data=batches)`` for ``obs-fast``, ``lobs`` and ``obd``, and of
  ``units.score_units(model, "abs_mrs", data=batches)``. Peak memory is the process's peak
  resident set size during the call above its resident size before it (Linux ``VmHWM``, reset
  before each call through ``/proc/self/clear_refs``; where that file cannot be written, the
  growth of ``resource.getrusage(...).ru_maxrss``, which only sees new peaks), in MB.
* **50 % channel pruning against Torch-Pruning**: prunelab removes half of the units of every
  unit layer (``units.remove_units(model, "abs_mrs", data=batches, fraction=0.5)``) and thins
  the model (``units.thin``), checking that the thinned model's outputs equal the masked
  model's; Torch-Pruning's ``MetaPruner`` (L2 magnitude importance, the output layer ignored,
  attention heads removed whole) prunes a copy of the same dense model, its pruning ratio
  bisected so that its parameter count is the closest to prunelab's (0.5 when prunelab's side
  failed). For both, in the same run: parameters, MACs of one example (FLOPs / 2 counted by
  ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix products, convolutions and
  attention, not recurrent cells), and the median forward latency at batch 1 and 64 (the zoo
  example repeated; models timed in interleaved rounds under ``torch.inference_mode``).
  Ratios are prunelab / Torch-Pruning: below 1 means prunelab's model is smaller or faster.
  **Target: latency ratio ≤ 1 at equal parameters.**

Every cell is run on its own copy of the model and catches its own failure, which the table
shows as ``✗n`` with the reason listed under it, so the script always completes.

    python benchmarks/zoo.py [--quick] [--models resnet18 hf-gpt2 ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import resource
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's prunelab, and the zoo

from zoo import BY_NAME, ZOO  # noqa: E402

import prunelab  # noqa: E402
from prunelab import units  # noqa: E402
from prunelab.inputs import inputs_batch  # noqa: E402

CRITERIA = ("obs-fast", "lobs", "obd")
BATCH_SIZES = (1, 64)
SPARSITY = 0.5


@dataclass(frozen=True)
class Settings:
    n_batches: int  # calibration batches
    batch: int  # examples per calibration batch
    rounds: int  # interleaved latency rounds
    repeats: int  # timed calls per model, batch size and round
    bisection: int  # Torch-Pruning ratio bisection steps


FULL = Settings(n_batches=4, batch=8, rounds=5, repeats=20, bisection=10)
QUICK = Settings(n_batches=2, batch=4, rounds=1, repeats=3, bisection=5)


# ----------------------------------------------------------------------------- measuring
class Failures:
    """Numbered failure reasons, shown as ``✗n`` in the table and listed under it."""

    def __init__(self):
        self.reasons: list[str] = []

    def add(self, where: str, err: BaseException) -> str:
        message = " ".join(str(err).split())
        if not message and err.__traceback__ is not None:  # a bare assert: say where it fired
            frame = traceback.extract_tb(err.__traceback__)[-1]
            message = f"at {Path(frame.filename).name}:{frame.lineno} ({frame.line})"
        if len(message) > 220:
            message = message[:217] + "..."
        self.reasons.append(f"{where}: {type(err).__name__}: {message}")
        return f"✗{len(self.reasons)}"


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


MEMORY_SOURCE = "VmHWM" if (_status_kb("VmHWM") is not None and _reset_peak()) else "ru_maxrss"


def measured(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``fn()``'s result, its seconds and the peak resident memory it added (MB)."""
    if MEMORY_SOURCE == "VmHWM":
        before = _status_kb("VmRSS")
        _reset_peak()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") if MEMORY_SOURCE == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, seconds, max(peak - before, 0) / 1024


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def one_example(zoo) -> prunelab.inputs.Batch:
    return inputs_batch(zoo.example, where="benchmarks/zoo.py").slice(0, 1)


def macs(model: nn.Module, zoo) -> int:
    """MACs of one example. Autograd stays on: without it ``nn.TransformerEncoderLayer`` takes
    its fused fast path, which FlopCounterMode does not count."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        one_example(zoo).call(model.eval())
    return counter.get_total_flops() // 2


@torch.inference_mode()
def latencies(models: dict[str, nn.Module], zoo, settings: Settings) -> dict[str, dict[int, float]]:
    """Median forward time (ms) per model and batch size, over interleaved rounds."""
    batches = {b: one_example(zoo).repeat_to(b) for b in BATCH_SIZES}
    times = {name: {b: [] for b in BATCH_SIZES} for name in models}
    names = list(models)
    for index in range(settings.rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            model = models[name].eval()
            for b, batch in batches.items():
                for _ in range(2):  # warm-up
                    batch.call(model)
                for _ in range(settings.repeats):
                    start = time.perf_counter()
                    batch.call(model)
                    times[name][b].append((time.perf_counter() - start) * 1e3)
    return {name: {b: statistics.median(v) for b, v in per.items()} for name, per in times.items()}


# ----------------------------------------------------------------------------- the methods
def run_criterion(model: nn.Module, criterion: str, batches: list) -> str:
    pruner = prunelab.prune(model, SPARSITY, criterion=criterion, data=batches)
    sparsity = pruner.sparsity()
    return "" if abs(sparsity - SPARSITY) <= 0.02 else f" (sparsity {sparsity:.2f})"


def run_unit_scoring(model: nn.Module, batches: list) -> str:
    scores = units.score_units(model, "abs_mrs", data=batches)
    return "" if scores else " (no unit layers)"


def prunelab_channels(model: nn.Module, zoo, batches: list) -> nn.Module:
    """prunelab's 50 % channel pruning and thinning; refuses a thinned model whose outputs differ."""
    result = units.remove_units(model, "abs_mrs", data=batches, fraction=SPARSITY)
    small = units.thin(model, result)
    example = one_example(zoo).repeat_to(3)
    with torch.inference_mode():
        want = _logits(example.call(model.eval()))
        got = _logits(example.call(small.eval()))
    gap = (want - got).abs().max().item()
    if not gap <= 1e-4 * max(1.0, want.abs().max().item()):
        raise RuntimeError(f"the thinned model's outputs differ from the masked model's by {gap:.2e}")
    return small


def _logits(output) -> torch.Tensor:
    from prunelab.inputs import logits_of

    return logits_of(output)


def _head_counts(model: nn.Module) -> dict[nn.Module, int]:
    """Query/key/value projections of Hugging Face attention, for Torch-Pruning's ``num_heads``."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        return {}
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    counts = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in ("q_proj", "query"):
            counts[module] = heads
        elif isinstance(module, nn.Linear) and leaf in ("k_proj", "v_proj", "key", "value"):
            counts[module] = kv_heads
    return counts


def torch_pruning(dense: nn.Module, zoo, ratio: float) -> nn.Module:
    """A copy of ``dense`` pruned by Torch-Pruning's MetaPruner at ``ratio`` of the channels."""
    import torch_pruning as tp

    model = copy.deepcopy(dense).eval()
    example = one_example(zoo)
    with torch.no_grad():
        n_out = _logits(example.call(model)).shape[-1]
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == n_out]
    heads = _head_counts(model)
    pruner = tp.pruner.MetaPruner(
        model,
        example.inputs,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        num_heads=heads,
        prune_num_heads=bool(heads),
        prune_head_dims=not heads,
        head_pruning_ratio=ratio if heads else 0.0,
        output_transform=_logits,
    )
    pruner.step()
    with torch.no_grad():
        _logits(example.repeat_to(2).call(model))  # a pruned model that cannot run is a failure
    return model


def torch_pruning_at(dense: nn.Module, zoo, target: int | None, steps: int) -> nn.Module:
    """Torch-Pruning's model with the parameter count closest to ``target`` (ratio 0.5 if None)."""
    if target is None:
        return torch_pruning(dense, zoo, SPARSITY)
    low, high, best = 0.0, 0.95, None
    for _ in range(steps):
        ratio = (low + high) / 2
        model = torch_pruning(dense, zoo, ratio)
        if best is None or abs(n_params(model) - target) < abs(n_params(best) - target):
            best = model
        if n_params(model) > target:
            low = ratio
        else:
            high = ratio
    return best


# ----------------------------------------------------------------------------- one row
class CellTimeout(Exception):
    """A cell ran past its time limit (Torch-Pruning's grouping never ends on LLaMA, for one)."""


def _alarm(signum, frame):
    raise CellTimeout(f"gave up after {LIMIT_S:.0f} s (--limit)")


LIMIT_S = 60.0


def quiet(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with warnings silenced and, on Unix, stopped after ``LIMIT_S`` seconds."""

    def run():
        timed = hasattr(signal, "setitimer")
        if timed:
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn()
        finally:
            if timed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

    return run


def cost_cell(name: str, label: str, fn: Callable[[], str], failures: Failures) -> str:
    try:
        note, seconds, megabytes = measured(quiet(fn))
    except Exception as err:  # a cell's failure is a table entry, never a crash
        return failures.add(f"{name}, {label}", err)
    return f"{seconds:.2f} s, {megabytes:.1f} MB{note}"


def channel_cells(zoo, dense: nn.Module, batches: list, settings: Settings, failures: Failures) -> list[str]:
    name = zoo.name
    small = tp_model = None
    try:
        small = quiet(lambda: prunelab_channels(copy.deepcopy(dense), zoo, batches))()
    except Exception as err:
        mark = failures.add(f"{name}, prunelab channels", err)
    try:
        tp_model = quiet(lambda: torch_pruning_at(dense, zoo, small and n_params(small), settings.bisection))()
    except Exception as err:
        tp_mark = failures.add(f"{name}, Torch-Pruning", err)
    if tp_model is not None and n_params(tp_model) == n_params(dense):
        tp_model, tp_mark = (
            None,
            failures.add(f"{name}, Torch-Pruning", RuntimeError("pruned nothing (it found no prunable group)")),
        )
    models = {k: m for k, m in (("prunelab", small), ("tp", tp_model)) if m is not None}
    try:
        counts = {k: (n_params(m), macs(m, zoo)) for k, m in models.items()}
        times = latencies(models, zoo, settings) if models else {}
    except Exception as err:
        mark = failures.add(f"{name}, measuring", err)
        return [mark] * 4

    # the same layer shapes in the same order: the same computation, so a latency gap is noise
    same = len(models) == 2 and same_shapes(small, tp_model)

    def pair(value: Callable[[str], float], fmt: str, note: str = "") -> str:
        left = fmt.format(value("prunelab")) if "prunelab" in models else mark
        right = fmt.format(value("tp")) if "tp" in models else tp_mark
        ratio = f" ({value('prunelab') / value('tp'):.2f}×{note})" if len(models) == 2 else ""
        return f"{left} / {right}{ratio}"

    note = ", same shapes" if same else ""
    return [
        pair(lambda k: counts[k][0], "{:,}", note),
        pair(lambda k: counts[k][1], "{:,}"),
        pair(lambda k: times[k][1], "{:.2f}"),
        pair(lambda k: times[k][64], "{:.2f}"),
    ]


def same_shapes(a: nn.Module, b: nn.Module) -> bool:
    """Every parameter of ``a`` has the shape of ``b``'s parameter of the same name, and back."""
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}
    return shapes(a) == shapes(b)


def row(zoo, settings: Settings, failures: Failures) -> list[str]:
    dense = zoo.build(0)
    batches = zoo.batches(settings.n_batches, seed=0, batch=settings.batch)
    cells = [zoo.name, f"{n_params(dense):,}"]
    for criterion in CRITERIA:
        cells.append(
            cost_cell(
                zoo.name, criterion, lambda c=criterion: run_criterion(copy.deepcopy(dense), c, batches), failures
            )
        )
    cells.append(cost_cell(zoo.name, "unit scoring", lambda: run_unit_scoring(copy.deepcopy(dense), batches), failures))
    return cells + channel_cells(zoo, dense, batches, settings, failures)


HEADERS = (
    "model",
    "params",
    *CRITERIA,
    "unit scoring (abs_mrs)",
    "params: prunelab / TP",
    "MACs: prunelab / TP",
    "ms b1: prunelab / TP",
    "ms b64: prunelab / TP",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches, rounds and bisection steps (< 1 min)")
    parser.add_argument("--models", nargs="+", choices=[z.name for z in ZOO], default=[z.name for z in ZOO])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--limit", type=float, default=None, help="seconds after which a cell is given up (default 30, --quick 10)"
    )
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.limit is not None and args.limit <= 0:
        parser.error("--limit must be positive")
    global LIMIT_S
    LIMIT_S = args.limit or (10.0 if args.quick else 30.0)
    settings = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    failures = Failures()
    rows = [row(BY_NAME[name], settings, failures) for name in args.models]
    one, five, _ = os.getloadavg()
    print(
        f"prunelab {prunelab.__version__} ({Path(prunelab.__file__).parent}), torch {torch.__version__}, "
        f"{args.threads} thread(s), "
        f"{'--quick' if args.quick else 'full'} ({settings.n_batches} calibration batches of {settings.batch}, "
        f"latency: median of {settings.rounds} round(s) × {settings.repeats} calls); "
        f"peak memory: {MEMORY_SOURCE}; cell limit {LIMIT_S:.0f} s; {time.perf_counter() - start:.0f} s, "
        f"load {one:.2f}/{five:.2f} on {os.cpu_count()} cores\n"
    )
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "|".join([":---"] + ["---:"] * (len(HEADERS) - 1)) + "|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    if failures.reasons:
        print()
        for index, reason in enumerate(failures.reasons, 1):
            print(f"- ✗{index} {reason}")


if __name__ == "__main__":
    main()
