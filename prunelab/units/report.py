"""Parameters, FLOPs and measured latency of a dense model and its pruned versions, side by side.

    report = units.speed_report({"dense": model, "pruned": small}, example_inputs=batch)
    print(report)          # a Markdown table; ratios are against the first model

FLOPs are :func:`prunelab.metrics.count_flops` per sample (dense: every weight counted, as a thinned
model has no zeros to skip); latency is :func:`prunelab.metrics.measure_latency`'s median of one
forward call (prefill: the whole example sequence at once) at each batch size, the example's first
sample repeated. All models are measured in the same process, in ``rounds`` interleaved rounds (the
order reversed every other round), and the median over rounds is reported, so that drift of a
shared machine affects every model alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

from torch import nn

from prunelab._validation import MAX_BATCH, MAX_REPEATS, THREADS, Interval, Sizes, Types, validate_params


@dataclass(frozen=True)
class ModelSpeed:
    name: str
    params: int
    flops: int
    latency_ms: dict[int, float]  # batch size → median milliseconds


@dataclass(frozen=True)
class SpeedReport:
    rows: tuple[ModelSpeed, ...]
    threads: int

    def ratio(self, name: str, what: str, batch_size: int | None = None) -> float:
        """``what`` (``"params"``, ``"flops"`` or ``"latency"``) of model ``name`` over the first model's."""
        row, base = next(r for r in self.rows if r.name == name), self.rows[0]
        if what == "latency":
            if batch_size is None:  # no latency without a batch size: the KeyError of the lookup
                raise KeyError(batch_size)
            return row.latency_ms[batch_size] / base.latency_ms[batch_size]
        return getattr(row, what) / getattr(base, what)

    def __str__(self) -> str:
        sizes = list(self.rows[0].latency_ms)
        head = ["model", "params", "×", "FLOPs/sample", "×"] + [x for b in sizes for x in (f"ms @{b}", "×")]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [
                r.name,
                f"{r.params:,}",
                f"{self.ratio(r.name, 'params'):.2f}",
                f"{r.flops:,}",
                f"{self.ratio(r.name, 'flops'):.2f}",
            ]
            for b in sizes:
                cells += [f"{r.latency_ms[b]:.2f}", f"{self.ratio(r.name, 'latency', b):.2f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(f"\n(latency: median of one forward, {self.threads} thread(s); × = ratio to {self.rows[0].name})")
        return "\n".join(lines)


@validate_params(
    {
        "models": [Types(dict)],
        "batch_sizes": [Sizes(MAX_BATCH)],
        "threads": [THREADS, None],
        "warmup": [Interval(Integral, 0, MAX_REPEATS)],
        "repeats": [Interval(Integral, 1, MAX_REPEATS)],
        "rounds": [Interval(Integral, 1, MAX_REPEATS)],
    }
)
def speed_report(
    models: dict[str, nn.Module],
    example_inputs,
    *,
    batch_sizes=(1, 16),
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    rounds: int = 3,
) -> SpeedReport:
    """Measure every model of ``models`` (name → model) on ``example_inputs`` (inputs as the
    models take them, batch first; a :class:`prunelab.inputs.Batch` or a raw batch with targets is
    taken for its inputs)."""
    import statistics

    from prunelab.inputs import as_batch
    from prunelab.metrics import count_flops, measure_latency

    if not models:
        raise ValueError(
            "the 'models' parameter of speed_report must be a non-empty dict of name → model. Got {} instead."
        )
    rounds = int(rounds)
    inputs = as_batch(example_inputs, where="speed_report").inputs
    times: dict[str, dict[int, list[float]]] = {name: {} for name in models}
    used: int | None = None
    for r in range(rounds):
        for name in list(models) if r % 2 == 0 else list(models)[::-1]:
            for row in measure_latency(
                models[name],
                example_inputs=inputs,
                batch_sizes=batch_sizes,
                threads=threads,
                warmup=warmup,
                repeats=repeats,
            ):
                times[name].setdefault(row.batch_size, []).append(row.median_ms)
                used = row.threads
    rows = []
    for name, model in models.items():
        flops = sum(c.dense for c in count_flops(model, example_inputs=inputs).values())
        rows.append(
            ModelSpeed(
                name,
                sum(p.numel() for p in model.parameters()),
                flops,
                {b: statistics.median(t) for b, t in times[name].items()},
            )
        )
    assert used is not None  # every model was measured (at least one round and batch size)
    return SpeedReport(tuple(rows), used)
