"""Block-by-block pruning of a LLaMA-shaped decoder at scale (issue 17): seconds and peak memory
per block and in total, against the model's own bytes.

The model is ``transformers.LlamaForCausalLM`` built from a config with random weights, directly
in the target dtype (never a float32 copy first): ``--size 125m`` (12 layers, hidden 768,
intermediate 2048, 12 heads / 4 key-value heads, vocabulary 32000: 0.13 B parameters) or
``--size 1.1b`` (22 layers, hidden 2048, intermediate 5632, 32 heads / 4 key-value heads,
vocabulary 32000: 1.1 B, TinyLlama's shape); ``--layers K`` keeps only the first K decoder layers
of that shape, to extrapolate. The decoder layers' Linear weights (not the embeddings or the LM
head, as SparseGPT and Wanda do) are pruned 50 % on ``--sequences`` random token sequences of
``--length`` tokens, one line per ``--criteria`` entry: ``obs-fast`` block by block
(``blocks="model.layers"``), ``wanda`` in one calibration pass (the Pruner then scores and selects
one layer at a time), ``wanda-blocks`` block by block (the paper's variant: each block's norms
from the pruned blocks before it). Any ``<criterion>-blocks`` runs that criterion block by block.

Peak memory is the process's resident high-water mark (``VmHWM``, reset before each prune; see
``prunelab._memory``), printed per block (the report's layers), for the solver's calibration and
solves, and for the whole ``prune()`` call, which also holds the Pruner's masks (one per pruned
weight, in the weight's dtype) — all against the model's bytes (target: under 2×).

Cost (2·params FLOPs per token and forward): sequential mode runs each block on its cached inputs
once per group of layers that share an input (q/k/v, o, gate/up, down: 4) and once more to make
the next block's inputs, plus one traced forward of the whole model — about 6 forwards, 12 GFLOP
per token at 1.1 B; the Hessians ``2·d²`` per token and layer add ~2.5 GFLOP per token; the
obs-fast solves ~11 TFLOP in all (``d³`` factorisations, ``rows·d²`` updates; down_proj's
5632-wide Hessian is half of it). The defaults, 32 sequences of 128 tokens (4096 tokens), make
~70 TFLOP: about 10 minutes on 2 cores in float32 (~80 GFLOP/s per core measured for a float32
Linear on the project machine). A bfloat16 Linear runs ~8× slower there (an AVX2 CPU without
bfloat16 instructions: 10 GFLOP/s per core), so ``--dtype bfloat16`` shows the memory (half the
model's bytes) rather than the time; ``--compute float32`` runs each served block in float32
(``compute_dtype``), leaving only the trace pass in bfloat16. The full runs (the lead's, on a
quiet machine)::

    OMP_NUM_THREADS=2 python benchmarks/llm_scale.py --size 1.1b     # float32: obs-fast, wanda, wanda-blocks
    OMP_NUM_THREADS=2 python benchmarks/llm_scale.py --size 1.1b --dtype bfloat16 --criteria obs-fast
    OMP_NUM_THREADS=2 python benchmarks/llm_scale.py --size 1.1b --dtype bfloat16 --compute float32 --criteria obs-fast
    OMP_NUM_THREADS=2 python benchmarks/llm_scale.py --size 125m --sequences 128 --length 512

Small runs: ``--size 125m --sequences 8 --length 64``, ``--size 1.1b --layers 2``. Run one criterion per
process (``--criteria wanda``) for a peak that no earlier line's memory can raise: the resident
high-water mark is reset per prune, but the allocator keeps what earlier lines freed.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch

from prunelab._memory import PeakMemory, resident
from prunelab.pruning import prune
from prunelab.pruning.criteria import CRITERIA

SHAPES = {
    "125m": dict(
        num_hidden_layers=12, hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4
    ),
    "1.1b": dict(
        num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4
    ),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@contextmanager
def default_dtype(dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build(size: str, layers: int | None, dtype: torch.dtype, seed: int = 0):
    """The decoder with random weights, its parameters made in ``dtype`` from the start."""
    import transformers as T

    shape = dict(SHAPES[size])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = T.LlamaConfig(
        vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, use_cache=False, **shape
    )
    torch.manual_seed(seed)
    with default_dtype(dtype):
        model = T.LlamaForCausalLM(config)
    return model.eval()


def calibration(n: int, length: int, batch: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32000, (n, length), generator=g)
    return [{"input_ids": tokens[i : i + batch]} for i in range(0, n, batch)]


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decoder_layers(model) -> list[str]:
    return [
        name for name, m in model.named_modules() if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
    ]


def run(criterion: str, args, dtype) -> dict:
    baseline = resident()  # the interpreter, torch and transformers, before the model
    model = build(args.size, args.layers, dtype)
    size = model_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    batches = calibration(args.sequences, args.length, args.batch)
    name, block_wise = line_of(criterion)
    spec, options = name, {}
    if block_wise:
        options.update(blocks="model.layers", offload="disk" if args.disk else None, progress=args.progress)
        if args.compute is not None:
            spec = {"name": name, "compute_dtype": args.compute}
    memory: dict = {}
    started, cpu = time.perf_counter(), time.process_time()
    with PeakMemory(memory) as whole:
        pruner = prune(model, 0.5, criterion=spec, data=batches, layers=decoder_layers(model), **options)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    report = pruner.history[-1].report
    if args.verbose and report is not None:
        print(report)
    print(
        f"\n== {criterion} ({'block by block' if block_wise else 'one calibration pass'}), "
        f"{n_params / 1e9:.3f} B parameters in {args.dtype}: model {size / 2**30:.2f} GiB, "
        f"{args.sequences}×{args.length} tokens in batches of {args.batch}"
    )
    if report is not None and hasattr(report, "blocks"):
        print(f"{'block':<18} {'layers':>6} {'seconds':>8} {'peak GiB':>9} {'× model':>8} {'live MiB':>9}")
        for b in report.blocks():
            peak = b["peak_memory"]
            print(
                f"{b['block']:<18} {b['layers']:>6} {b['seconds']:8.1f} {_gib(peak):>9} "
                f"{_ratio(peak, size):>8} {b['live_bytes'] / 2**20:9.1f}"
            )
        print(
            f"trace pass: {report.trace_seconds:.1f} s; solver's peak {_gib(report.peak_memory)} GiB "
            f"({_ratio(report.peak_memory, size)} the model)"
        )
    print(
        f"total: {seconds:.1f} s wall, {cpu:.1f} s CPU (all threads); whole prune() peak {_gib(whole.peak)} GiB "
        f"({_ratio(whole.peak, size)} the model; includes the Pruner's masks); "
        f"sparsity {pruner.history[-1].sparsity:.3f}"
    )
    if baseline is not None and whole.peak is not None:
        print(
            f"resident before building the model: {_gib(baseline)} GiB; peak above it "
            f"{_gib(whole.peak - baseline)} GiB ({_ratio(whole.peak - baseline, size)} the model)"
        )
    return {"seconds": seconds, "peak": whole.peak, "bytes": size}


SOLVERS = ("obs-fast", "obs-exact", "lobs")  # always block by block here


def line_of(entry: str) -> tuple[str, bool]:
    """A ``--criteria`` entry as (criterion, block by block)."""
    name = entry.removesuffix("-blocks")
    return name, entry != name or name in SOLVERS


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _ratio(n, size) -> str:
    return "-" if n is None else f"{n / size:.2f}×"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SHAPES), default="1.1b")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first K decoder layers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per calibration batch")
    parser.add_argument(
        "--criteria",
        default="obs-fast,wanda,wanda-blocks",
        help="comma-separated lines: a criterion, or <criterion>-blocks for block by block",
    )
    parser.add_argument("--disk", action="store_true", help="spill the cached block inputs to disk")
    parser.add_argument("--progress", action="store_true", help="show the bar over blocks")
    parser.add_argument(
        "--compute",
        choices=["float32"],
        default=None,
        help="run the served block in float32 (a bfloat16/float16 model): compute_dtype",
    )
    parser.add_argument("--verbose", action="store_true", help="print the per-layer report")
    args = parser.parse_args()
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be at least 1. Got {args.layers} instead.")
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for criterion in args.criteria.split(","):
        if line_of(criterion)[0] not in CRITERIA.names():
            print(f"\n== {criterion}: skipped, not a registered criterion (registered: {', '.join(CRITERIA.names())})")
            continue
        run(criterion, args, dtype)


if __name__ == "__main__":
    main()
