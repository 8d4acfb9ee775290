"""One-shot Wanda and N:M on a LLaMA-shaped decoder with random weights: seconds, peak memory and
the output drift each method costs on held-out tokens.

The model is ``transformers``' LlamaForCausalLM built from a config (never downloaded): grouped-
query attention, SwiGLU MLP. Each row prunes a fresh copy to 50 % (every output row with Wanda's
default scope, or 2:4 / 4:8) with calibration on ``--calibration`` random-token sequences, and
reports the wall time of the prune, the peak resident memory of the process so far, and the
relative change of the logits on other random tokens, ``‖ŷ − y‖ / ‖y‖`` (random weights: a
measure of how much each mask disturbs the function, not of quality on text).

    python benchmarks/wanda_nm.py                            # ~5M parameters, seconds
    python benchmarks/wanda_nm.py --hidden 768 --layers 12 --intermediate 2048 --calibration 128
"""

from __future__ import annotations

import argparse
import copy
import resource
import time

import torch

import prunelab

METHODS = (
    ("magnitude", "weight", 0.5),
    ("wanda", "weight", 0.5),
    ("magnitude", "2:4", None),
    ("wanda", "2:4", None),
    ("wanda", "4:8", None),
)


def build(hidden: int, layers: int, intermediate: int, vocab: int, seed: int):
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=max(hidden // 64, 2),
        num_key_value_heads=max(hidden // 256, 1),
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return T.LlamaForCausalLM(config).eval()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--calibration", type=int, default=16, help="calibration sequences")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dense = build(args.hidden, args.layers, args.intermediate, args.vocab, args.seed)
    n_params = sum(p.numel() for p in dense.parameters())
    g = torch.Generator().manual_seed(args.seed)
    calibration = [
        {"input_ids": torch.randint(0, args.vocab, (4, args.seq), generator=g)}
        for _ in range(max(args.calibration // 4, 1))
    ]
    held_out = torch.randint(0, args.vocab, (4, args.seq), generator=g)
    with torch.no_grad():
        reference = dense(input_ids=held_out).logits
    layers = [name for name, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    print(
        f"LLaMA-shaped decoder: {n_params / 1e6:.1f}M parameters, {len(layers)} pruned Linear layers, "
        f"{args.calibration} x {args.seq} calibration tokens, torch threads {torch.get_num_threads()}"
    )
    print(f"{'criterion':<10} {'pattern':<8} {'sparsity':>8} {'seconds':>8} {'peak MiB':>9} {'logit drift':>11}")
    for criterion, granularity, sparsity in METHODS:
        model = copy.deepcopy(dense)
        started = time.perf_counter()
        pruner = prunelab.prune(
            model,
            sparsity,
            criterion=criterion,
            granularity=granularity,
            layers=layers,
            data=calibration if criterion == "wanda" else None,
        )
        seconds = time.perf_counter() - started
        with torch.no_grad():
            drift = float((model(input_ids=held_out).logits - reference).norm() / reference.norm())
        print(
            f"{criterion:<10} {granularity:<8} {pruner.sparsity():8.4f} {seconds:8.2f} {peak_mib():9.0f} {drift:11.4f}"
        )


if __name__ == "__main__":
    main()
