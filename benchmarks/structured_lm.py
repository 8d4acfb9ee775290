"""Structured pruning of a LLaMA-shaped decoder: heads, MLP channels and blocks, with and without the
least-squares refit, with channel counts rounded to 1, 8 or 64 (docs/units.md "Transformers").

A ``LlamaForCausalLM`` is built from a config with random weights (nothing is downloaded):

* ``--size full``: 8 layers, hidden 512, 8 query / 4 key-value heads (head size 64), intermediate
  1500 (not a multiple of 8 or 64, so that rounding matters), vocabulary 8000: about 32M parameters;
  sequences of 128 tokens.
* ``--size small``: 4 layers, hidden 256, 4 / 2 heads, intermediate 700, vocabulary 2000: about 5M
  parameters; sequences of 64 tokens.

Calibration: ``--calibration`` random token sequences; held-out: 8 other random sequences. For
every setting (25 % and 50 % of heads and MLP channels, each with ``round_to`` 1, 8 and 64; 1 and 2
blocks removed) the table gives parameters, FLOPs per sequence and the median prefill latency at
batch 1 and 16 as ratios to the dense model measured in the same run (one latency per thinned
shape: the refit does not change shapes), and the relative output error on the held-out sequences,
``Σ‖logits − logits_dense‖² / Σ‖logits_dense‖²``, without the refit and with each refit mode
(``layerwise``, the default, and ``sequential``), with how many of the refit layers passed the
held-out check.

    python benchmarks/structured_lm.py --size small          # about 5 minutes on 1 thread
    python benchmarks/structured_lm.py --size full --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from prunelab import units

SIZES = {
    "small": dict(
        num_hidden_layers=4,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=700,
        vocab_size=2000,
        seq=64,
    ),
    "full": dict(
        num_hidden_layers=8,
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1500,
        vocab_size=8000,
        seq=128,
    ),
}
SETTINGS = [(f, f, 0, r) for f in (0.25, 0.5) for r in (1, 8, 64)] + [(0.0, 0.0, 1, 1), (0.0, 0.0, 2, 1)]


def build(size: str):
    import transformers

    options = dict(SIZES[size])
    seq = options.pop("seq")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        max_position_embeddings=seq,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        **options,
    )
    return transformers.LlamaForCausalLM(config).eval(), seq, options["vocab_size"]


def tokens(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    return [{"input_ids": ids[i : i + 4]} for i in range(0, n, 4)]


def relative_error(model, dense_logits, held) -> float:
    num = den = 0.0
    with torch.no_grad():
        for batch, reference in zip(held, dense_logits):
            got = model(**batch).logits
            num += float((got - reference).double().pow(2).sum())
            den += float(reference.double().pow(2).sum())
    return num / den


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=64, help="calibration sequences")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, seq, vocab = build(args.size)
    calibration, held = tokens(args.calibration, seq, vocab, 1), tokens(8, seq, vocab, 2)
    with torch.no_grad():
        dense_logits = [dense(**b).logits for b in held]
    example = {"input_ids": held[0]["input_ids"][:1]}
    n_params = sum(p.numel() for p in dense.parameters())
    print(
        f"# LLaMA-shaped decoder, {args.size}: {n_params / 1e6:.1f}M parameters, sequences of {seq} tokens, "
        f"{args.calibration} calibration sequences; torch {torch.__version__}, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)\n"
    )
    rows, models = [], {"dense": dense}
    for heads, mlp, blocks, round_to in SETTINGS:
        label = f"heads {heads:.0%} mlp {mlp:.0%} round_to {round_to}" if blocks == 0 else f"{blocks} block(s)"
        errors, seconds, applied = {}, {}, {}
        for refit in (False, "layerwise", "sequential"):
            start = time.perf_counter()
            result = units.prune_transformer(
                dense, calibration, heads=heads, mlp=mlp, blocks=blocks, refit=refit, round_to=round_to, batch_size=4
            )
            seconds[refit] = time.perf_counter() - start
            errors[refit] = relative_error(result.model, dense_logits, held)
            if refit:
                applied[refit] = f"{sum(r.applied for r in result.refits)}/{len(result.refits)}"
        models[label] = result.model
        mlp_width = result.model.model.layers[0].mlp.down_proj.in_features
        q_width = result.model.model.layers[0].self_attn.q_proj.out_features
        rows.append((label, mlp_width, q_width, result.removed_blocks, errors, seconds, applied))
    report = units.speed_report(
        models, example, batch_sizes=(1, 16), threads=args.threads, repeats=args.repeats, warmup=2, rounds=args.rounds
    )
    print(
        "| setting | MLP width | q width | blocks removed | params × | FLOPs × | latency × @1 | latency × @16 "
        "| error, no refit | error, layerwise refit (applied) | error, sequential refit (applied) "
        "| seconds (none / layerwise / sequential) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = report.rows[0]
    print(
        f"| dense | {dense.config.intermediate_size} | {dense.model.layers[0].self_attn.q_proj.out_features} | – "
        f"| 1.00 | 1.00 | 1.00 ({base.latency_ms[1]:.1f} ms) | 1.00 ({base.latency_ms[16]:.1f} ms) | 0 | 0 | 0 | – |"
    )
    for label, mlp_width, q_width, removed, errors, seconds, applied in rows:
        print(
            f"| {label} | {mlp_width} | {q_width} | {removed or '–'} | {report.ratio(label, 'params'):.2f} | "
            f"{report.ratio(label, 'flops'):.2f} | {report.ratio(label, 'latency', 1):.2f} | "
            f"{report.ratio(label, 'latency', 16):.2f} | {errors[False]:.4f} | {errors['layerwise']:.4f} "
            f"({applied['layerwise']}) | {errors['sequential']:.4f} ({applied['sequential']}) | "
            f"{seconds[False]:.1f} / {seconds['layerwise']:.1f} / {seconds['sequential']:.1f} |"
        )


if __name__ == "__main__":
    main()
