"""``lstm-lm``: the LSTM language model of the gradual-pruning paper's PTB experiments, scaled down.

Zaremba, Sutskever & Vinyals 2014 ("Recurrent Neural Network Regularization"), as pruned by
Zhu & Gupta 2017 ("To prune, or not to prune"): an embedding, ``n_layers`` stacked LSTM layers of
``d_model`` units (the embedding has the same width), dropout on the embedding output, between the
LSTM layers and before the decoder, and a linear decoder over the vocabulary. The paper's models
are 2 × 1500 (large) and 2 × 650 (medium) on a 10k-word vocabulary; the defaults here are 2 × 256.
``tied=True`` shares the decoder's weight with the embedding (Press & Wolf 2017); the paper's
models are untied, the default.

Each sequence starts from a zero state (the batches ``fit`` shuffles are independent windows; the
paper carried the state across consecutive windows instead). Inputs are token ids ``(N, T)`` of any
length; the output is logits ``(N, T, vocab)``. The LSTM weights are ``nn.LSTM``'s
``weight_ih_l*``/``weight_hh_l*``, which prunelab prunes by default, gate rows as units.
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab._validation import check_number, check_type
from prunelab.models.gpt import check_token_ids, context_of
from prunelab.models.registry import MODELS

INIT_RANGE = 0.1  # Zaremba et al.'s uniform init of the embedding and decoder (their small model)


class LSTMLanguageModel(nn.Module):
    """``embed → drop → lstm → drop → decoder``."""

    def __init__(self, vocab: int, d_model: int = 256, n_layers: int = 2, dropout: float = 0.0, tied: bool = False):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, d_model)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(
            d_model, d_model, num_layers=n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0
        )
        self.decoder = nn.Linear(d_model, vocab)
        nn.init.uniform_(self.embed.weight, -INIT_RANGE, INIT_RANGE)
        nn.init.uniform_(self.decoder.weight, -INIT_RANGE, INIT_RANGE)
        nn.init.zeros_(self.decoder.bias)
        if tied:
            self.decoder.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(input_ids, self.vocab, "lstm-lm")
        out, _ = self.lstm(self.drop(self.embed(input_ids)))
        return self.decoder(self.drop(out))


@MODELS.register("lstm-lm", "lstm_lm")
def lstm_lm(
    input_shape: tuple[int, ...],
    n_classes: int,
    *,
    d_model: int = 256,
    n_layers: int = 2,
    dropout: float = 0.0,
    tied: bool = False,
) -> LSTMLanguageModel:
    """LSTM language model: ``n_classes`` is the vocabulary; ``input_shape=(T,)`` is a sequence length
    (any length runs; it is what dry runs and ``summary`` use)."""
    where = "lstm-lm"
    context_of(input_shape, where)
    d_model = check_number("d_model", d_model, where=where, low=1, integer=True)
    n_layers = check_number("n_layers", n_layers, where=where, low=1, integer=True)
    dropout = check_number("dropout", dropout, where=where, low=0.0, high=1.0, closed="left")
    check_type("tied", tied, bool, where=where)
    return LSTMLanguageModel(n_classes, d_model, n_layers, dropout, tied)
