"""``gpt``: a GPT-style decoder-only language model built from plain torch layers.

Radford et al. 2019 ("Language Models are Unsupervised Multitask Learners", GPT-2) in miniature:
token + learned position embeddings, ``n_layers`` pre-norm blocks — ``x + attn(ln1(x))`` then
``x + mlp(ln2(x))`` — of causal multi-head self-attention and a GELU MLP, a final LayerNorm and a
linear head over the vocabulary, tied to the token embedding by default.

Every weight sits in an ``nn.Linear`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` of each
attention; ``fc1``, ``fc2`` of each MLP; ``lm_head``) or an ``nn.Embedding``, so every prunelab
method applies: weight criteria and the layer-wise solvers see ordinary Linear layers, and
``prunelab.units`` finds each block's attention heads and MLP channels by these names. The number
of heads is read from the projections' shapes at every call, so a model whose heads were removed
(thinned) runs as it is.

Built by name: ``build_model("gpt", input_shape=(context,), n_classes=vocab, d_model=…)`` or
``build_model("gpt", dataset=text_dataset)`` (its ``seq_len`` and vocabulary). Inputs are token ids
``(N, T)`` with ``T ≤ context``; the output is logits ``(N, T, vocab)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from prunelab._validation import check_number, check_type
from prunelab.models.registry import MODELS


def context_of(input_shape: tuple[int, ...], where: str) -> int:
    """The sequence length of a language model's ``input_shape`` ``(T,)``."""
    if len(input_shape) != 1:
        raise ValueError(
            f"the 'input_shape' parameter of {where} must be (context,), the longest token sequence "
            f"the model takes (e.g. input_shape=(128,), or dataset= a text dataset). Got "
            f"{tuple(input_shape)} instead."
        )
    return int(input_shape[0])


def check_token_ids(input_ids: torch.Tensor, vocab: int, where: str) -> None:
    """Token ids must be an integer ``(N, T)`` tensor (a float tensor is a wrong input, not ids)."""
    if (
        not torch.is_tensor(input_ids)
        or input_ids.dtype.is_floating_point
        or input_ids.dtype.is_complex
        or input_ids.dtype == torch.bool
        or input_ids.dim() != 2
    ):
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise TypeError(
            f"{where} takes token ids: an integer tensor of shape (N, T) with values in [0, {vocab}). "
            f"Got {got} instead (with input_shape, pass dtype=torch.long or example_inputs= token ids)."
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections (``head_dim`` per head)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads = n_heads
        self.head_dim = d_model // n_heads
        inner = n_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, inner)
        self.k_proj = nn.Linear(d_model, inner)
        self.v_proj = nn.Linear(d_model, inner)
        self.o_proj = nn.Linear(inner, d_model)
        self.dropout = dropout

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        n, length, _ = t.shape
        return t.view(n, length, -1, self.head_dim).transpose(1, 2)  # (N, heads, T, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(x)), self._split(self.k_proj(x)), self._split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``: ``d_model → d_ff → d_model``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm decoder block: ``x + drop(attn(ln1(x)))``, then ``x + drop(mlp(ln2(x)))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Token + position embeddings → ``blocks`` → ``ln_f`` → ``lm_head`` (logits over the vocabulary)."""

    def __init__(
        self,
        vocab: int,
        context: int,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.0,
        tied: bool = True,
    ):
        super().__init__()
        self.vocab, self.context = vocab, context
        self.tok_embed = nn.Embedding(vocab, d_model)
        self.pos_embed = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self._init_weights(n_layers)
        if tied:
            self.lm_head.weight = self.tok_embed.weight

    def _init_weights(self, n_layers: int) -> None:
        """GPT-2's: normal(0, 0.02) weights, zero biases; the residual projections (``o_proj``,
        ``fc2``) scaled by 1/√(2·n_layers) so the residual stream's variance does not grow with depth."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj", "fc2")) else 0.02
                nn.init.normal_(module.weight, 0.0, std)
                bias = getattr(module, "bias", None)  # an Embedding has none
                if bias is not None:
                    nn.init.zeros_(bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(input_ids, self.vocab, "gpt")
        length = input_ids.shape[1]
        if length > self.context:
            raise ValueError(
                f"gpt: the input has {length} tokens, more than the model's context of "
                f"{self.context} (its input_shape); cut the sequences or build a longer context."
            )
        positions = torch.arange(length, device=input_ids.device)
        x = self.drop(self.tok_embed(input_ids) + self.pos_embed(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


@MODELS.register("gpt")
def gpt(
    input_shape: tuple[int, ...],
    n_classes: int,
    *,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    d_ff: int | None = None,
    dropout: float = 0.0,
    tied: bool = True,
) -> GPT:
    """GPT-style decoder: ``n_classes`` is the vocabulary, ``input_shape=(context,)`` the longest input;
    ``d_ff`` defaults to ``4·d_model``; ``tied`` shares the head's weight with the token embedding."""
    where = "gpt"
    context = context_of(input_shape, where)
    d_model = check_number("d_model", d_model, where=where, low=1, integer=True)
    n_layers = check_number("n_layers", n_layers, where=where, low=0, integer=True)
    n_heads = check_number("n_heads", n_heads, where=where, low=1, integer=True)
    if d_model % n_heads:
        raise ValueError(f"the 'n_heads' parameter of {where} must divide d_model={d_model}. Got {n_heads} instead.")
    if d_ff is not None:
        d_ff = check_number("d_ff", d_ff, where=where, low=1, integer=True)
    dropout = check_number("dropout", dropout, where=where, low=0.0, high=1.0, closed="left")
    check_type("tied", tied, bool, where=where)
    return GPT(n_classes, context, d_model, n_layers, n_heads, d_ff, dropout, tied)
