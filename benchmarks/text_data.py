"""Cost of the text datasets and of a training step of the registry language models.

Times, on the pydocs corpus (``$PRUNELAB_DATA/pydocs``) and in a fresh tmp cache: training the
byte-level BPE tokenizer on the train split, encoding each split, the whole first
``load_dataset("pydocs")`` (checksums, tokenizer, encoding, writing the cache), and a cached load
(re-hashing every cached file). Then the median time of an Adam step of ``gpt`` and ``lstm-lm`` at
their default sizes (batch ``--batch`` × 128 tokens) and of evaluating one batch.

    python benchmarks/text_data.py [--chars 2000000] [--vocab 8192] [--batch 16] [--steps 3]

``--chars 0`` uses the whole train split (the full numbers; about a minute on 2 cores); the
default trains the tokenizer on its first 2M characters (encoding still covers every split).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import prunelab
from prunelab.data import load_dataset, text
from prunelab.data.tokenizer import encode, train_tokenizer


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def tokenizer_rows(texts: dict[str, str], chars: int, vocab: int) -> None:
    train = texts["train"][:chars] if chars else texts["train"]
    tok, seconds = timed(lambda: train_tokenizer(train, vocab))
    print(f"tokenizer: trained on {len(train):,} characters in {seconds:.2f} s, vocabulary {tok.get_vocab_size()}")
    for split, body in texts.items():
        ids, seconds = timed(lambda: encode(tok, body))
        print(
            f"  encode {split}: {len(body):,} characters -> {len(ids):,} tokens in {seconds:.2f} s "
            f"({len(body) / len(ids):.2f} characters per token)"
        )


def load_rows(vocab: int) -> prunelab.data.TextDataset:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["PRUNELAB_CACHE"] = cache
        ds, first = timed(lambda: load_dataset("pydocs", vocab_size=vocab))
        _, cached = timed(lambda: load_dataset("pydocs", vocab_size=vocab))
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
    print(
        f"load_dataset('pydocs', vocab_size={vocab}): first {first:.2f} s, cached {cached:.3f} s, "
        f"cache {size / 1e6:.1f} MB; {ds}"
    )
    return ds


def step_rows(ds, batch: int, steps: int) -> None:
    x, y = ds.x_train[:batch], ds.y_train[:batch]
    for name in ("gpt", "lstm-lm"):
        model = prunelab.build_model(name, dataset=ds, seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        with torch.no_grad():
            _, evaluation = timed(lambda: model.eval()(x))
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name}: {params:,} parameters; train step {statistics.median(times[1:]) * 1e3:.0f} ms, "
            f"forward (eval) {evaluation * 1e3:.0f} ms at batch {batch} x {ds.seq_len} tokens"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=2_000_000)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    texts = text.PYDOCS.texts()
    tokenizer_rows(texts, args.chars, args.vocab)
    ds = load_rows(args.vocab)
    step_rows(ds, args.batch, args.steps)


if __name__ == "__main__":
    main()
