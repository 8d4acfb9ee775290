"""FLOPs and parameter counts of ``summary`` on every model of the zoo, checked against references.

* Dense FLOPs equal ``torch.utils.flop_counter.FlopCounterMode``'s total for the same forward plus
  the bias adds (which FlopCounterMode does not count), exactly. FlopCounterMode does not see
  the fused CPU kernels (``scaled_dot_product_attention``'s flash kernel, oneDNN's LSTM, the
  TransformerEncoderLayer fast path), so its forward runs them decomposed into matmuls
  (:func:`decomposed`); the bias adds are counted from module hooks (:func:`module_uses`).
* Zeroing half of every default target weight lowers the remaining FLOPs by ``2·P`` per zero,
  ``P`` being the positions (tokens, pixels, time steps) at which the weight is applied.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from zoo import BY_NAME, HAS_TRANSFORMERS, zoo_params

from prunelab.inputs import as_batch
from prunelab.metrics import count_flops, summary
from prunelab.pruning.targets import TiedWeightSkipped, is_hf_conv1d, resolve_targets

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@contextlib.contextmanager
def decomposed():
    """Attention and recurrent layers run as plain matmuls that FlopCounterMode counts:
    MultiheadAttention's fast path off, oneDNN's RNN kernels off, SDPA's math backend."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mkldnn.flags warns about TF32
            with torch.backends.mkldnn.flags(enabled=False), sdpa_kernel(SDPBackend.MATH):
                yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def flop_counter_total(model: nn.Module, batch) -> int:
    with torch.no_grad(), decomposed(), FlopCounterMode(display=False) as counter:
        batch.call(model)
    return counter.get_total_flops()


@dataclass
class Uses:
    """From module hooks: ``bias_adds`` of one forward, and the positions at which each weight
    tensor (by id) is applied."""

    bias_adds: int = 0
    positions: dict[int, int] = field(default_factory=dict)

    def weight(self, weight: torch.Tensor, positions: int) -> None:
        self.positions[id(weight)] = self.positions.get(id(weight), 0) + positions


def module_uses(model: nn.Module, batch) -> Uses:
    """Bias adds and weight positions, read at module boundaries (independent of the counter):
    a biased Linear/Conv/HF Conv1D adds one bias entry per output element; a MultiheadAttention
    (self-attention here) its q/k/v biases per token and its out_proj bias per output element;
    an RNN every bias once per (sample, time step)."""
    uses = Uses()

    def hook(module, args, output):
        if isinstance(module, nn.MultiheadAttention):
            query, key, value = args[:3]
            assert query is key is value, "the reference handles self-attention only"
            tokens = query.numel() // module.embed_dim
            uses.weight(module.in_proj_weight, tokens)
            uses.weight(module.out_proj.weight, tokens)
            uses.bias_adds += 3 * query.numel() + output[0].numel()
        elif isinstance(module, nn.RNNBase):
            steps = args[0].numel() // module.input_size
            for name, param in module.named_parameters(recurse=False):
                if name.startswith("weight"):
                    uses.weight(param, steps)
                else:
                    uses.bias_adds += steps * param.numel()
        else:
            n_out = module.weight.shape[1] if is_hf_conv1d(module) else module.weight.shape[0]
            uses.weight(module.weight, output.numel() // n_out)
            if module.bias is not None:
                uses.bias_adds += output.numel()

    kinds = (nn.Linear, *CONV, nn.MultiheadAttention, nn.RNNBase)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds) or is_hf_conv1d(m)]
    try:
        with torch.no_grad():
            batch.call(model)
    finally:
        for handle in handles:
            handle.remove()
    return uses


def one_sample(zoo_model):
    """The zoo model's example cut to its first sample (``summary`` runs the first sample)."""
    return as_batch(zoo_model.example, where="test").repeat_to(1)


def default_targets(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TiedWeightSkipped)
        return resolve_targets(model)


@pytest.mark.parametrize("zoo_model", zoo_params())
def test_dense_flops_equal_flop_counter_plus_bias_adds(zoo_model):
    model = zoo_model.build()
    batch = one_sample(zoo_model)
    result = summary(model, example_inputs=zoo_model.example)
    reference = flop_counter_total(model, batch) + module_uses(model, batch).bias_adds
    assert result.total.flops_dense == reference
    with decomposed():  # the count does not depend on which kernels run
        assert summary(model, example_inputs=zoo_model.example).total == result.total
    assert result.total.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("zoo_model", zoo_params())
def test_half_zero_weights_lower_remaining_by_their_products(zoo_model):
    model = zoo_model.build()
    batch = one_sample(zoo_model)
    uses = module_uses(model, batch)
    before = summary(model, example_inputs=zoo_model.example)
    expected_drop: dict[str, int] = {}
    zeros_added = 0
    for target in default_targets(model):
        weight = target.weight
        nonzero = int(torch.count_nonzero(weight))
        with torch.no_grad():
            weight.view(-1)[: weight.numel() // 2] = 0.0
        zeros = nonzero - int(torch.count_nonzero(weight))
        assert zeros >= weight.numel() // 2 - 1  # random weights: (almost) no zeros before
        zeros_added += zeros
        drop = 2 * uses.positions[id(weight)] * zeros
        expected_drop[target.module_name] = expected_drop.get(target.module_name, 0) + drop
    # MultiheadAttention's out_proj is applied functionally, but its FLOPs stay on its own row
    after = summary(model, example_inputs=zoo_model.example)
    assert after.total.flops_dense == before.total.flops_dense
    assert before.total.flops - after.total.flops == sum(expected_drop.values())
    for old, new in zip(before.rows, after.rows):
        assert (old.name, old.flops_dense) == (new.name, new.flops_dense)
        assert (old.flops or 0) - (new.flops or 0) == expected_drop.get(old.name, 0), old.name
    assert after.total.prunable == sum(t.weight.numel() for t in default_targets(model))
    assert after.total.prunable - after.total.prunable_nonzero == zeros_added


def test_flops_of_the_transformer_encoder_by_hand():
    # d = 16, 4 heads of 4, T = 8 tokens, feed-forward 32, one sample. Per layer:
    #   self_attn: in_proj 2·8·48·16 + 48·8 = 12672; QKᵀ and AV 2·4·8·8·(4 + 4) = 4096 → 16768
    #   out_proj 2·8·16·16 + 16·8 = 4224; linear1 2·8·32·16 + 32·8 = 8448; linear2 2·8·16·32 + 16·8 = 8320
    model = BY_NAME["transformer"].build()
    rows = {row.name: row for row in summary(model, example_inputs=torch.ones(1, 8, dtype=torch.long)).rows}
    for layer in ("encoder.layers.0", "encoder.layers.1"):
        assert rows[f"{layer}.self_attn"].flops_dense == 16768
        assert rows[f"{layer}.self_attn.out_proj"].flops_dense == 4224
        assert rows[f"{layer}.linear1"].flops_dense == 8448 and rows[f"{layer}.linear2"].flops_dense == 8320
        assert rows[f"{layer}.self_attn"].prunable == 3 * 16 * 16  # in_proj_weight
    assert rows["embed"].flops_dense == 0  # a gather
    assert rows["head"].flops_dense == 2 * 16 * 5 + 5


@pytest.mark.parametrize("name", ["lstm-lm", "gru-lm"])
def test_recurrent_flops_per_time_step_by_hand(name):
    # d = 16, 2 layers, T = 8: per layer and step 2·(G·16·16 + G·16·16) + 2·G·16 with G = 4 (LSTM), 3 (GRU)
    model = BY_NAME[name].build()
    gates = 4 if name == "lstm-lm" else 3
    per_step = 2 * (2 * (gates * 16 * 16 * 2) + 2 * gates * 16)
    rows = {row.name: row for row in summary(model, example_inputs=torch.ones(1, 8, dtype=torch.long)).rows}
    assert rows["rnn"].flops_dense == 8 * per_step
    assert rows["rnn"].prunable == 2 * 2 * gates * 16 * 16


hf = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")


@pytest.fixture(scope="module")
def gpt2():
    return BY_NAME["hf-gpt2"]


@hf
def test_gpt2_tied_lm_head_counted_once_and_its_zeros_discounted(gpt2):
    model = gpt2.build()
    assert model.lm_head.weight is model.transformer.wte.weight
    before = summary(model, example_inputs=gpt2.example)
    rows = {row.name: row for row in before.rows}
    assert before.total.params == sum(p.numel() for p in model.parameters())  # the tied tensor once
    assert rows["lm_head"].params == 0 and rows["transformer.wte"].params == 61 * 16
    assert rows["lm_head"].prunable == 0 and rows["transformer.wte"].prunable == 0  # skipped by default
    assert rows["lm_head"].flops_dense == 2 * 8 * 16 * 61  # 8 tokens, no bias
    assert rows["transformer.h.0.attn.c_attn"].prunable == 16 * 48  # HF Conv1D
    with torch.no_grad():
        model.transformer.wte.weight[:30] = 0.0  # 30 of 61 vocabulary rows
    after = {row.name: row for row in summary(model, example_inputs=gpt2.example).rows}
    assert after["lm_head"].flops == rows["lm_head"].flops - 2 * 8 * 30 * 16
    assert after["transformer.wte"].flops == 0  # lookups cost nothing


@hf
def test_attention_counted_alike_by_sdpa_and_by_eager_matmuls(gpt2):
    model = gpt2.build()
    fused = summary(model, example_inputs=gpt2.example)
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "eager"  # QKᵀ and AV as torch.matmul
    eager = summary(model, example_inputs=gpt2.example)
    assert [(r.name, r.flops_dense) for r in eager.rows] == [(r.name, r.flops_dense) for r in fused.rows]
    rows = {row.name: row for row in eager.rows}
    assert rows["transformer.h.0.attn"].flops_dense == 2 * 4 * 8 * 8 * (4 + 4)  # QKᵀ and AV, causal not discounted


@hf
@pytest.mark.parametrize("name", ["hf-bert", "hf-llama"])
def test_keyword_example_inputs_keep_integer_dtypes(name):
    zoo_model = BY_NAME[name]
    example = zoo_model.example
    assert example["input_ids"].dtype == torch.long
    counts = count_flops(zoo_model.build(), example_inputs=example)
    with_mask = summary(zoo_model.build(), example_inputs=example)
    assert sum(c.dense for c in counts.values()) == with_mask.total.flops_dense
    assert with_mask.input_shape == {key: (8,) for key in example}
