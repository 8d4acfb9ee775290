"""The zoo: small models that prunelab did not design, for tests parametrised over all of them.

Residual (ResNet-18-style BasicBlocks with BatchNorm), depthwise (MobileNetV2-style inverted
residuals), attention (``nn.TransformerEncoder`` classifier over token embeddings), recurrent (LSTM
and GRU language models with embeddings), and — when ``transformers`` is installed — Hugging Face
GPT-2, BERT, ViT and LLaMA with grouped-query attention, built from tiny configs with random
weights (never downloaded).

Each entry is a :class:`ZooModel`: ``build()`` returns a fresh seeded model in eval mode,
``batches(n, seed)`` a list of ``n`` calibration batches in the form the model takes (``(x, y)``
pairs, token tensors, or dicts of keyword inputs), ``example`` one input for dry runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
N_CLASSES = 5
VOCAB = 61
SEQ = 8
IMAGE = (3, 16, 16)


# --------------------------------------------------------------------------- residual
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 layout (stem, four stages of two BasicBlocks) at tiny widths."""

    def __init__(self, widths=(8, 8, 16, 16), n_classes: int = N_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, n_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- depthwise
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, n_classes: int = N_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 2), InvertedResidual(8, 12, 2, 3), InvertedResidual(12, 12, 1, 3)
        )
        self.head = nn.Sequential(nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.classifier = nn.Linear(24, n_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean(dim=(2, 3)))


# --------------------------------------------------------------------------- attention
class TransformerClassifier(nn.Module):
    """Token embedding, ``nn.TransformerEncoder`` (2 layers, batch first), mean pool, linear head."""

    def __init__(self, d_model: int = 16, n_classes: int = N_CLASSES):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


# --------------------------------------------------------------------------- recurrent
class RNNLanguageModel(nn.Module):
    """Embedding, a 2-layer LSTM or GRU, and a linear decoder: token logits ``(N, T, V)``."""

    def __init__(self, cell: str = "lstm", d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(d, d, num_layers=2, batch_first=True)
        self.decoder = nn.Linear(d, VOCAB)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.decoder(out)


# --------------------------------------------------------------------------- Hugging Face
def _gpt2():
    import transformers as T

    return T.GPT2LMHeadModel(
        T.GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=4,
            n_inner=32,
            vocab_size=VOCAB,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def _bert():
    import transformers as T

    return T.BertForSequenceClassification(
        T.BertConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=4,
            intermediate_size=32,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            num_labels=N_CLASSES,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
    )


def _vit():
    import transformers as T

    return T.ViTForImageClassification(
        T.ViTConfig(
            image_size=IMAGE[1],
            patch_size=4,
            num_channels=IMAGE[0],
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=4,
            intermediate_size=32,
            num_labels=N_CLASSES,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def _llama():
    import transformers as T

    return T.LlamaForCausalLM(
        T.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            vocab_size=VOCAB,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    )


# --------------------------------------------------------------------------- data
def _images(n: int, g: torch.Generator, batch: int):
    x = torch.randn(n * batch, *IMAGE, generator=g)
    y = torch.randint(0, N_CLASSES, (n * batch,), generator=g)
    return [(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(n)]


def _tokens(n: int, g: torch.Generator, batch: int):
    return torch.randint(1, VOCAB, (n, batch, SEQ), generator=g)


def _class_tokens(n, g, batch):
    t = _tokens(n, g, batch)
    return [(t[i], torch.randint(0, N_CLASSES, (batch,), generator=g)) for i in range(n)]


def _lm_tokens(n, g, batch):
    return [t for t in _tokens(n, g, batch)]  # inputs only: next-token targets


def _hf_lm(n, g, batch):
    return [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in _tokens(n, g, batch)]


def _hf_classify(n, g, batch):
    t = _tokens(n, g, batch)
    return [
        {
            "input_ids": t[i],
            "attention_mask": torch.ones_like(t[i]),
            "labels": torch.randint(0, N_CLASSES, (batch,), generator=g),
        }
        for i in range(n)
    ]


def _hf_images(n, g, batch):
    return [{"pixel_values": x, "labels": y} for x, y in _images(n, g, batch)]


@dataclass(frozen=True)
class ZooModel:
    name: str
    factory: Callable[[], nn.Module]
    data: Callable
    kind: str  # "residual", "depthwise", "attention", "recurrent", "hf"
    hf: bool = False

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory().eval()

    def batches(self, n: int = 2, seed: int = 0, batch: int = 4) -> list:
        return self.data(n, torch.Generator().manual_seed(seed), batch)

    @property
    def example(self):
        """One batch's inputs (no targets), as the model takes them."""
        from prunelab.inputs import as_batch

        return as_batch(self.batches(1, seed=1, batch=2)[0], where="zoo").inputs


ZOO = [
    ZooModel("resnet18", ResNet, lambda n, g, b: _images(n, g, b), "residual"),
    ZooModel("mobilenetv2", MobileNetV2, lambda n, g, b: _images(n, g, b), "depthwise"),
    ZooModel("transformer", TransformerClassifier, _class_tokens, "attention"),
    ZooModel("lstm-lm", lambda: RNNLanguageModel("lstm"), _lm_tokens, "recurrent"),
    ZooModel("gru-lm", lambda: RNNLanguageModel("gru"), _lm_tokens, "recurrent"),
    ZooModel("hf-gpt2", _gpt2, _hf_lm, "hf", hf=True),
    ZooModel("hf-bert", _bert, _hf_classify, "hf", hf=True),
    ZooModel("hf-vit", _vit, _hf_images, "hf", hf=True),
    ZooModel("hf-llama", _llama, _hf_lm, "hf", hf=True),
]
BY_NAME = {z.name: z for z in ZOO}


def zoo_params(names=None):
    """``pytest.param`` s over the zoo (or the named entries), HF ones skipped without transformers."""
    chosen = ZOO if names is None else [BY_NAME[n] for n in names]
    return [
        pytest.param(
            z, id=z.name, marks=pytest.mark.skipif(z.hf and not HAS_TRANSFORMERS, reason="transformers not installed")
        )
        for z in chosen
    ]
