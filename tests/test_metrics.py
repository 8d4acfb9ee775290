"""Tests of prunelab.metrics: every expected number is computed by hand in the comments."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from prunelab.metrics import FlopCount, count_flops, csr_fillers, csr_no_fill_bits, storage_bits, summary
from prunelab.metrics import storage as storage_module

# --------------------------------------------------------------------------- helpers


def linear_4_3() -> nn.Sequential:
    """Linear(4, 3) with W = [[1,0,2,0],[0,0,0,0],[3,4,5,6]] (6 of 12 non-zero) and b = [1,0,0]."""
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 2, 0], [0, 0, 0, 0], [3, 4, 5, 6]]))
        model[0].bias.copy_(torch.tensor([1.0, 0, 0]))
    return model


def conv_strided() -> nn.Sequential:
    """Conv2d(2, 3, 3, stride=2, padding=1): filter 0 all zero, filter 1's input channel 0 zero.

    W has 3·2·3·3 = 54 entries; zeroed 18 (filter 0) + 9 (filter 1, channel 0) = 27 → 27 non-zero.
    Bias [0, 0.5, 0.5] → 2 of 3 non-zero.
    """
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1))
    with torch.no_grad():
        conv = model[0]
        conv.weight.fill_(1.0)
        conv.weight[0].zero_()
        conv.weight[1, 0].zero_()
        conv.bias.copy_(torch.tensor([0.0, 0.5, 0.5]))
    return model


def reference_csr(flat: list[float], index_bits: int) -> list[tuple[int, float]]:
    """Slow, obviously-correct CSR encoder: walk the elements, emit (zeros skipped, value)."""
    largest_skip = 2**index_bits - 1
    entries, zeros = [], 0
    for value in flat:
        if value == 0:
            zeros += 1
            continue
        while zeros > largest_skip:
            entries.append((largest_skip, 0.0))  # filler: skips 2^r − 1 zeros, is itself a zero
            zeros -= largest_skip + 1
        entries.append((zeros, value))
        zeros = 0
    return entries  # trailing zeros are not stored


def reference_decode(entries: list[tuple[int, float]], length: int) -> list[float]:
    out = []
    for skip, value in entries:
        out += [0.0] * skip + [value]
    return out + [0.0] * (length - len(out))


def row_major(tensor: torch.Tensor) -> list[float]:
    """Elements in row-major order, by explicit multi-index (independent of reshape)."""
    return [float(tensor[index]) for index in itertools.product(*map(range, tensor.shape))]


def own_hooks_empty(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- parameter counts


def test_linear_counts_by_hand():
    row = summary(linear_4_3(), (4,)).rows[0]
    assert (row.name, row.type) == ("0", "Linear")
    assert row.params == 15  # 12 weights + 3 biases
    assert row.nonzero == 7  # 6 weights + 1 bias
    assert (row.prunable, row.prunable_nonzero) == (12, 6)  # the weight only
    assert row.sparsity == pytest.approx(0.5)  # 1 − 6/12
    assert row.compression == pytest.approx(15 / 7)


def test_total_params_equal_model_parameters():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    result = summary(model, (1, 4, 4))
    assert result.total.params == sum(p.numel() for p in model.parameters())
    assert result.total.params == sum(row.params for row in result.rows)
    assert [row.name for row in result.rows] == ["0", "1", "4"]


def test_total_sparsity_is_over_prunable_weights_only():
    # weights 12 + 54 = 66 prunable, non-zero 6 + 27 = 33 → sparsity 1 − 33/66 = 0.5
    # all params 15 + 57 = 72, non-zero 7 + 29 = 36 → compression 72/36 = 2
    model = nn.ModuleDict({"fc": linear_4_3()[0], "conv": conv_strided()[0]})
    model.forward = lambda x: model["fc"](x)  # conv never called: FLOPs 0, parameters still counted
    total = summary(model, (4,)).total
    assert (total.prunable, total.prunable_nonzero) == (66, 33)
    assert total.sparsity == pytest.approx(0.5)
    assert (total.params, total.nonzero) == (72, 36)
    assert total.compression == pytest.approx(2.0)


def test_prunable_names_select_weights():
    model = linear_4_3()
    row = summary(model, (4,), prunable=["0.bias"]).rows[0]
    assert (row.prunable, row.prunable_nonzero) == (3, 1)  # bias [1, 0, 0]
    assert row.sparsity == pytest.approx(2 / 3)
    single = summary(model, (4,), prunable="0.weight").rows[0]
    assert single.prunable == 12
    none = summary(model, (4,), prunable=[]).rows[0]
    assert none.prunable == 0 and none.sparsity is None


def test_all_zero_layer_gives_inf_compression_and_speedup():
    model = nn.Sequential(nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    row = summary(model, (3,)).rows[0]
    assert row.compression == math.inf and row.speedup == math.inf
    assert row.sparsity == 1.0 and row.flops == 0


# --------------------------------------------------------------------------- FLOPs


def test_linear_flops_by_hand():
    # P = 1 for a 2-D input. dense = 2·12·1 + 3·1 = 27; remaining = 2·6·1 + 1·1 = 13
    row = summary(linear_4_3(), (4,)).rows[0]
    assert (row.flops_dense, row.flops) == (27, 13)
    assert row.speedup == pytest.approx(27 / 13)


def test_linear_flops_on_a_sequence_input():
    # input (1, 5, 4): P = 5. dense = 2·12·5 + 3·5 = 135; remaining = 2·6·5 + 1·5 = 65
    flops = count_flops(linear_4_3(), (5, 4))["0"]
    assert (flops.dense, flops.remaining) == (135, 65)


def test_conv2d_flops_with_stride_and_padding_by_hand():
    # input (2, 5, 7): H_out = floor((5 + 2·1 − 3)/2) + 1 = 3, W_out = floor((7 + 2 − 3)/2) + 1 = 4, P = 12
    # dense = 2·54·12 + 3·12 = 1296 + 36 = 1332; remaining = 2·27·12 + 2·12 = 648 + 24 = 672
    model = conv_strided()
    assert model(torch.zeros(1, 2, 5, 7)).shape == (1, 3, 3, 4)
    row = summary(model, (2, 5, 7)).rows[0]
    assert (row.flops_dense, row.flops) == (1332, 672)
    assert row.speedup == pytest.approx(1332 / 672)


def test_grouped_conv_flops():
    # Conv2d(4, 4, 3, groups=2, padding=1, no bias) on (4, 6, 6): W is 4·2·3·3 = 72, P = 36
    # MACs by hand: 4 outputs · 36 positions · (4/2 in-channels · 9 taps) = 2592 → 5184 FLOPs = 2·72·36
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, padding=1, bias=False))
    assert count_flops(model, (4, 6, 6))["0"].dense == 5184


def test_conv1d_and_conv3d_flops():
    # Conv1d(2, 4, 3) on (2, 10): L_out = 8; dense = 2·24·8 + 4·8 = 416
    # Conv3d(1, 2, 2) on (1, 3, 3, 3): out 2·2·2 = 8 positions; dense = 2·16·8 + 2·8 = 272
    assert count_flops(nn.Sequential(nn.Conv1d(2, 4, 3)), (2, 10))["0"].dense == 416
    assert count_flops(nn.Sequential(nn.Conv3d(1, 2, 2)), (1, 3, 3, 3))["0"].dense == 272


def test_module_called_twice_is_counted_twice():
    # Linear(3, 3) with bias applied twice: 2 · (2·9 + 3) = 42
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert count_flops(Twice(), (3,))["fc"].dense == 42


def test_flops_of_a_mixed_model_with_a_recurrent_layer_by_hand():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm1d(4)
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.scale = Scale()
            self.fc = nn.Linear(5, 2)

        def forward(self, x):  # x: (B, 3, L)
            h = torch.relu(self.bn(self.conv(x)))
            out, _ = self.lstm(h.transpose(1, 2))
            return self.fc(self.scale(out[:, -1]))

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(5))

        def forward(self, x):
            return self.alpha * x

    model = Mixed()
    result = summary(model, (3, 6))
    rows = {row.name: row for row in result.rows}
    assert list(rows) == ["conv", "bn", "lstm", "scale", "fc"]
    assert rows["bn"].params == 8  # weight + bias; running stats are buffers
    assert rows["lstm"].params == sum(p.numel() for p in model.lstm.parameters())
    assert rows["scale"].params == 5 and rows["scale"].type == "Scale"
    for name in ("bn", "scale"):  # normalisation and elementwise work is not counted
        assert rows[name].flops_dense is None and rows[name].speedup is None
        assert rows[name].prunable == 0 and rows[name].sparsity is None
    # conv: L_out = 6, dense = 2·36·6 + 4·6 = 456; fc: 2·10 + 2 = 22
    # lstm: W_ih 20×4 = 80, W_hh 20×5 = 100, two biases of 20; 6 time steps of one sample:
    #   6·(2·(80 + 100) + 20 + 20) = 6·400 = 2400 → total 456 + 2400 + 22 = 2878
    assert rows["conv"].flops_dense == 456 and rows["fc"].flops_dense == 22
    assert rows["lstm"].flops_dense == 2400
    assert (rows["lstm"].prunable, rows["lstm"].sparsity) == (180, 0.0)  # its weights, not its biases
    assert result.total.flops_dense == 2878
    assert result.total.params == sum(p.numel() for p in model.parameters())


def test_embedding_model_with_integer_input():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(3 * 4, 2))
    result = summary(model, (3,), dtype=torch.long)
    assert [row.type for row in result.rows] == ["Embedding", "Linear"]
    # a lookup is a gather: 0 FLOPs (counted, not "-")
    assert result.rows[0].flops == 0 and result.rows[1].flops_dense == 2 * 24 + 2


def test_tied_weights_are_counted_once():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight
    result = summary(model, (3,))
    assert result.total.params == 9 == sum(p.numel() for p in model.parameters())
    assert [row.params for row in result.rows] == [9, 0]
    assert result.total.flops_dense == 2 * (2 * 9)  # both layers still run


def test_parameters_of_the_root_module_get_a_row():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 0.0]))

        def forward(self, x):
            return x * self.w

    result = summary(Root(), (2,))
    assert result.rows[0].name == "" and result.rows[0].nonzero == 1
    assert "(root)" in str(result)


# --------------------------------------------------------------------------- storage


def test_storage_bytes_of_the_linear_by_hand():
    # weight N = 12, nnz = 6, b = 32, r = 4: dense 384 bits = 48 B; bit-mask 12 + 192 = 204 bits → 26 B
    #   CSR: flattened [1,0,2,0,0,0,0,0,3,4,5,6] has gaps 0,1,5,0,0,0 (all ≤ 15) → 6·36 = 216 bits = 27 B
    # bias N = 3, nnz = 1: dense 96 bits = 12 B; bit-mask 3 + 32 = 35 → 5 B; CSR 36 bits → 5 B (tie → bit-mask)
    model = linear_4_3()
    assert storage_bits(model[0].weight) == {"dense": 384, "bitmask": 204, "csr": 216}
    assert storage_bits(model[0].bias) == {"dense": 96, "bitmask": 35, "csr": 36}
    row = summary(model, (4,)).rows[0]
    assert (row.bytes_dense, row.bytes_bitmask, row.bytes_csr) == (60, 31, 32)
    assert row.best_format == "bitmask" and row.bytes_best == 31


def test_storage_bytes_of_the_conv_by_hand():
    # row-major positions 0..26 are zero (filter 0, then filter 1's channel 0), 27..53 non-zero
    # one gap of 27 zeros: floor(27/16) = 1 filler → CSR (27 + 1)·36 = 1008 bits = 126 B
    # bit-mask 54 + 27·32 = 918 bits → 115 B; dense 54·32 = 1728 bits = 216 B
    weight = conv_strided()[0].weight
    assert csr_fillers(weight, 4) == 1
    assert storage_bits(weight) == {"dense": 1728, "bitmask": 918, "csr": 1008}


@pytest.mark.parametrize(
    ("values", "fillers"),
    [
        ([0, 0, 0, 1], 0),  # gap 3 = 2^r − 1 fits in the index
        ([0, 0, 0, 0, 1], 1),  # gap 4 = 2^r: one filler, then skip 0
        ([0] * 7 + [1], 1),  # gap 7 = 2^(r+1) − 1: one filler, then skip 3
        ([0] * 8 + [1], 2),  # gap 8 = 2^(r+1): two fillers
        ([1] + [0] * 20, 0),  # trailing zeros are not stored
        ([0] * 9, 0),  # nothing stored at all
        ([1, 0, 0, 0, 0, 1] + [0] * 8 + [1], 3),  # gaps 4 and 8 between non-zeros: 1 + 2
    ],
)
def test_csr_fillers_at_gap_boundaries(values, fillers):
    tensor = torch.tensor(values, dtype=torch.float32)
    assert csr_fillers(tensor, 2) == fillers  # r = 2: skips 0..3, a filler spans 4 positions
    nnz = sum(v != 0 for v in values)
    assert storage_bits(tensor, bits=8, index_bits=2)["csr"] == (nnz + fillers) * (8 + 2)


def test_csr_fillers_at_gap_boundaries_for_default_index_bits():
    # r = 4: gaps 15, 16, 32 → 0, 1, 2 fillers
    for gap, expected in ((15, 0), (16, 1), (32, 2)):
        assert csr_fillers(torch.tensor([0.0] * gap + [1.0]), 4) == expected


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.9, 0.97, 0.99, 1.0])
@pytest.mark.parametrize("index_bits", [1, 2, 4, 5])
def test_csr_bits_match_a_reference_encoder(sparsity, index_bits):
    generator = torch.Generator().manual_seed(round(100 * sparsity) + 1000 * index_bits)
    tensor = torch.randn(7, 11, 13, generator=generator)
    tensor[torch.rand(tensor.shape, generator=generator) < sparsity] = 0.0
    flat = row_major(tensor)
    entries = reference_csr(flat, index_bits)
    assert reference_decode(entries, len(flat)) == flat  # the reference really encodes the tensor
    nnz = sum(v != 0 for v in flat)
    assert csr_fillers(tensor, index_bits) == len(entries) - nnz
    assert storage_bits(tensor, bits=16, index_bits=index_bits)["csr"] == len(entries) * (16 + index_bits)


def test_csr_follows_row_major_order_of_non_contiguous_tensors():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(20, 30, generator=generator)
    base[torch.rand(base.shape, generator=generator) < 0.9] = 0.0
    transposed = base.t()
    expected = len(reference_csr(row_major(transposed), 3)) - int((transposed != 0).sum())
    assert csr_fillers(transposed, 3) == expected


def test_csr_fillers_are_exact_across_scan_slices(monkeypatch):
    monkeypatch.setattr(storage_module, "_CHUNK", 7)  # gaps now straddle slice boundaries
    generator = torch.Generator().manual_seed(3)
    tensor = torch.randn(500, generator=generator)
    tensor[torch.rand(500, generator=generator) < 0.95] = 0.0
    expected = len(reference_csr(tensor.tolist(), 2)) - int((tensor != 0).sum())
    assert csr_fillers(tensor, 2) == expected


def test_best_format_depends_on_sparsity():
    # N = 1600, b = 32, r = 4 → dense = 51200 bits
    dense = torch.ones(1600)
    # 0 %: bit-mask 1600 + 51200 = 52800, CSR 1600·36 = 57600 → dense
    half = torch.ones(1600)
    half.view(-1, 8)[:, 4:] = 0  # 50 %: bit-mask 1600 + 800·32 = 27200, CSR 800·36 = 28800 (gaps of 4) → bit-mask
    # (as a Linear weight this is 4:8, whose N:M format takes 200·4·(32 + 3) = 28000 bits; every
    # other weight zero would be 1:2, 800·(32 + 1) = 26400 bits, and the summary would pick N:M)
    sparse = torch.zeros(1600)
    sparse[::16] = 1  # 93.75 %: gaps of 15 fit r = 4; CSR 100·36 = 3600 < bit-mask 1600 + 3200 = 4800
    for tensor, best in ((dense, "dense"), (half, "bitmask"), (sparse, "csr")):
        sizes = storage_bits(tensor)
        assert min(sizes, key=sizes.get) == best
        model = nn.Sequential(nn.Linear(1600, 1, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(tensor[None])
        assert summary(model, (1600,)).total.best_format == best


def test_csr_needs_index_bits_that_cover_the_gaps_at_95_percent():
    # N = 1000, every 20th non-zero (95 %, nnz = 50, 49 gaps of 19 zeros), b = 32:
    # r = 4: 49 fillers → CSR 99·36 = 3564 > bit-mask 1000 + 50·32 = 2600 → bit-mask
    # r = 5: no fillers  → CSR 50·37 = 1850 < 2600 → CSR
    tensor = torch.zeros(1000)
    tensor[::20] = 1.0
    assert storage_bits(tensor, index_bits=4) == {"dense": 32000, "bitmask": 2600, "csr": 3564}
    assert storage_bits(tensor, index_bits=5)["csr"] == 1850


def test_mixed_best_format_and_effective_compression():
    # weight (50 % zeros, in pairs): bit-mask 12 + 6·32 = 204 bits → 26 B is best (CSR 6·36 → 27 B;
    # it is 2:4 too, and the N:M format ties: 3·2·(32 + 2) = 204 bits)
    # bias dense [1, 2, 3]: dense 12 B is best (bit-mask 3 + 96 = 99 bits → 13 B)
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 1, 0, 0]] * 3))
        model[0].bias.copy_(torch.tensor([1.0, 2, 3]))
    result = summary(model, (4,))
    assert result.total.best_format == "mixed"
    assert result.total.bytes_best == 26 + 12
    assert result.effective_compression == pytest.approx((48 + 12) / 38)


# --------------------------------------------------------------------------- Zhu & Gupta's count (no fillers)


def test_no_fill_count_equals_csr_when_every_gap_fits_the_index():
    # linear_4_3: weight gaps 0,1,5,0,0,0 and bias gap 0, all ≤ 15 → no fillers at r = 4
    #   weight 6·36 = 216 bits = 27 B, bias 1·36 = 36 bits → 5 B: the same as exact CSR
    model = linear_4_3()
    assert storage_bits(model[0].weight, no_fill=True) == {"dense": 384, "bitmask": 204, "csr": 216, "csr_no_fill": 216}
    assert csr_no_fill_bits(1, 32, 4) == 36
    row = summary(model, (4,)).rows[0]
    assert row.bytes_csr_no_fill == row.bytes_csr == 32


def test_fillers_make_exact_csr_larger_than_the_no_fill_count():
    # conv_strided weight: 27 non-zeros after one gap of 27 zeros → 1 filler at r = 4
    #   exact CSR (27 + 1)·36 = 1008 bits = 126 B; no fill 27·36 = 972 bits → 122 B (121.5 rounded up)
    #   the difference is exactly the filler: 1·(32 + 4) = 36 bits
    # bias [0, 0.5, 0.5]: gap 1, no filler → 2·36 = 72 bits = 9 B in both
    weight = conv_strided()[0].weight
    sizes = storage_bits(weight, no_fill=True)
    assert sizes["csr"] == 1008 and sizes["csr_no_fill"] == 972
    assert sizes["csr"] - sizes["csr_no_fill"] == csr_fillers(weight, 4) * (32 + 4)
    total = summary(conv_strided(), (2, 6, 6)).total
    assert (total.bytes_csr, total.bytes_csr_no_fill) == (126 + 9, 122 + 9)


def test_no_fill_count_is_never_the_best_format():
    # N = 1000, every 20th non-zero (95 %, nnz = 50, 49 gaps of 19 zeros), b = 32, r = 4:
    #   exact CSR (50 + 49)·36 = 3564 bits, bit-mask 1000 + 1600 = 2600, no fill 50·36 = 1800:
    #   the no-fill count is the smallest, but no file can hold it, so bit-mask stays the best
    tensor = torch.zeros(1000)
    tensor[::20] = 1.0
    sizes = storage_bits(tensor, no_fill=True)
    assert sizes == {"dense": 32000, "bitmask": 2600, "csr": 3564, "csr_no_fill": 1800}
    assert storage_module.best_format(sizes) == "bitmask"
    model = nn.Sequential(nn.Linear(1000, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(tensor[None])
    result = summary(model, (1000,))
    assert result.total.best_format == "bitmask" and result.total.bytes_best == 325
    assert result.total.bytes_csr_no_fill == 225  # 1800 bits
    assert result.to_dict()["total"]["bytes_csr_no_fill"] == 225
    assert "fill" not in str(result) and "fill" not in result.to_markdown()  # not a printed column
    # "auto" uses the exact CSR's width, r = 5 here (no fillers): 50·37 = 1850 bits in both
    auto = storage_bits(tensor, index_bits="auto", no_fill=True)
    assert auto["csr"] == auto["csr_no_fill"] == 1850


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_no_fill_count_crosses_the_bit_mask_at_one_minus_one_over_r(bits):
    # no fill nnz·(b + r) < bit-mask N + nnz·b  ⇔  nnz·r < N: with r = 4 at 75 % sparsity, whatever b
    # N = 1600: every 4th kept (75 %, nnz 400): 400·(b + 4) = 1600 + 400·b, a tie
    #           every 5th kept (80 %, nnz 320): 320·(b + 4) < 1600 + 320·b by 320 bits
    #           every 3rd kept (66.7 %, nnz 534): 534·(b + 4) > 1600 + 534·b by 536 bits
    for step, nnz, no_fill_minus_mask in ((4, 400, 0), (5, 320, -320), (3, 534, 536)):
        tensor = torch.zeros(1600)
        tensor[::step] = 1.0
        sizes = storage_bits(tensor, bits=bits, no_fill=True)
        assert sizes["csr_no_fill"] == nnz * (bits + 4)
        assert sizes["csr_no_fill"] - sizes["bitmask"] == no_fill_minus_mask
        assert sizes["csr"] == sizes["csr_no_fill"]  # gaps of 2, 3, 4 zeros fit r = 4


@pytest.mark.parametrize("index_bits", [2, 4, 5])
def test_no_fill_count_is_exact_csr_less_its_fillers(index_bits):
    generator = torch.Generator().manual_seed(index_bits)
    tensor = torch.randn(30, 40, generator=generator)
    tensor[torch.rand(tensor.shape, generator=generator) < 0.9] = 0.0
    sizes = storage_bits(tensor, bits=16, index_bits=index_bits, no_fill=True)
    nnz = int((tensor != 0).sum())
    entries = reference_csr(row_major(tensor), index_bits)
    assert sizes["csr_no_fill"] == nnz * (16 + index_bits)
    assert sizes["csr"] - sizes["csr_no_fill"] == (len(entries) - nnz) * (16 + index_bits) > 0


def test_no_fill_must_be_a_bool():
    with pytest.raises(TypeError, match="no_fill"):
        storage_bits(torch.ones(3), no_fill="yes")


# --------------------------------------------------------------------------- the model is left as it was


def test_hooks_removed_and_modes_restored():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary(model, (4,))  # BatchNorm1d on a batch of 1 only works because the dry run is in eval mode
    assert own_hooks_empty(model)
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    count_flops(model, (4,))
    assert not any(m.training for m in model.modules())


def test_hooks_removed_and_modes_restored_when_the_forward_fails():
    model = nn.Sequential(nn.Linear(4, 3))
    model.train()
    with pytest.raises(ValueError):
        summary(model, (5,))
    assert own_hooks_empty(model) and model.training and model[0].training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_cuda():
    model = linear_4_3().cuda()
    row = summary(model, (4,)).rows[0]
    assert (row.nonzero, row.flops, row.bytes_csr) == (7, 13, 32)


# --------------------------------------------------------------------------- output formats


def test_to_dict_is_json_serialisable_with_inf_as_string():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    record = summary(model, (3,)).to_dict()
    text = json.dumps(record, allow_nan=False)
    assert json.loads(text)["rows"][0]["compression"] == "inf"
    assert record["total"]["params"] == 8 + 6
    assert set(record) == {"input_shape", "bits", "index_bits", "effective_compression", "rows", "total"}


def test_text_and_markdown_tables():
    result = summary(linear_4_3(), (4,))
    text = str(result)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["layer", "type", "params", "nonzero"]
    assert lines[-2].startswith("total") and "27" in lines[-2] and "bitmask" in lines[-2]
    assert "50.00" in text and "2.14" in text and "2.08" in text  # sparsity %, 15/7, 27/13
    markdown = result.to_markdown()
    assert markdown.startswith("| layer | type |")
    assert "| **total** |" in markdown
    assert repr(result).startswith("Summary(rows=1, params=15,")


# --------------------------------------------------------------------------- bad input


def test_wrong_input_shape_names_input_shape_and_the_model_error():
    with pytest.raises(ValueError, match=r"input_shape.*mat1 and mat2|mat1 and mat2.*input_shape") as info:
        summary(linear_4_3(), (1, 28, 28))
    assert "input_shape" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("shape", [(0, 4), (-1,), (2.0,), "4", None, (True,)])
def test_malformed_input_shape(shape):
    with pytest.raises(ValueError, match="'input_shape' parameter of summary"):
        summary(linear_4_3(), shape)


def test_unknown_prunable_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"'0\.wieght'.*did you mean '0\.weight'.*0\.weight, 0\.bias"):
        summary(linear_4_3(), (4,), prunable=["0.wieght"])
    with pytest.raises(TypeError, match="'prunable' parameter of summary"):
        summary(linear_4_3(), (4,), prunable=3)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"index_bits": 0},
            ValueError,
            "the 'index_bits' parameter of summary must be an int in [1, 16]. Got 0 instead.",
        ),
        ({"index_bits": 17}, ValueError, "'index_bits' parameter of summary"),
        ({"bits": 0}, ValueError, "the 'bits' parameter of summary must be an int in [1, 64]. Got 0 instead."),
        ({"bits": 65}, ValueError, "'bits' parameter of summary"),
        ({"bits": 8.0}, TypeError, "'bits' parameter of summary"),
        ({"bits": True}, TypeError, "'bits' parameter of summary"),
        ({"device": 3}, TypeError, "'device' parameter of summary"),
        ({"device": "nonsense"}, ValueError, "'device' parameter of summary"),
        ({"dtype": "float32"}, TypeError, "'dtype' parameter of summary"),
    ],
)
def test_invalid_parameters(kwargs, error, message):
    with pytest.raises(error) as info:
        summary(linear_4_3(), (4,), **kwargs)
    assert message in str(info.value)


def test_invalid_model_and_tensor_arguments():
    with pytest.raises(TypeError, match="'model' parameter of summary"):
        summary(lambda x: x, (4,))
    with pytest.raises(TypeError, match="'tensor' parameter of storage_bits"):
        storage_bits([1.0, 0.0])
    with pytest.raises(ValueError, match="'index_bits' parameter of csr_fillers"):
        csr_fillers(torch.ones(3), 0)
    with pytest.raises(ValueError, match="'bits' parameter of storage_bits"):
        storage_bits(torch.ones(3), bits=0)


# --------------------------------------------------------------------------- example inputs


def test_example_inputs_give_the_same_numbers_as_input_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        model[0].weight[0].zero_()
    by_shape = summary(model, (1, 6, 6))
    by_example = summary(model, example_inputs=torch.randn(5, 1, 6, 6))  # its first sample is run
    assert by_example.rows == by_shape.rows and by_example.total == by_shape.total
    assert by_example.input_shape == by_shape.input_shape == (1, 6, 6)
    assert count_flops(model, example_inputs=torch.randn(2, 1, 6, 6)) == count_flops(model, (1, 6, 6))


def test_positional_and_keyword_example_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2, bias=False)

        def forward(self, x, y=None):
            return self.a(x) + self.b(y)

    # a: 2·6 + 2 = 14; b: 2·10 = 20
    model = Two()
    positional = summary(model, example_inputs=(torch.ones(4, 3), torch.ones(4, 5)))
    keyword = summary(model, example_inputs={"x": torch.ones(4, 3), "y": torch.ones(4, 5)})
    assert positional.total.flops_dense == keyword.total.flops_dense == 34
    assert positional.input_shape == [(3,), (5,)] and keyword.input_shape == {"x": (3,), "y": (5,)}
    assert json.loads(json.dumps(keyword.to_dict()))["input_shape"] == {"x": [3], "y": [5]}
    assert "per sample of inputs {'x': (3,), 'y': (5,)}" in str(keyword)


def test_integer_example_inputs_keep_their_dtype():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(3 * 4, 2))
    by_example = summary(model, example_inputs=torch.tensor([[1, 2, 3]]))
    assert by_example.total == summary(model, (3,), dtype=torch.long).total


def test_example_inputs_errors():
    with pytest.raises(ValueError, match="summary takes exactly one of 'input_shape'.*Got both"):
        summary(linear_4_3(), (4,), example_inputs=torch.ones(1, 4))
    with pytest.raises(ValueError, match="'input_shape' parameter of summary.*or give 'example_inputs'"):
        summary(linear_4_3())
    with pytest.raises(TypeError, match="'example_inputs' parameter of count_flops"):
        count_flops(linear_4_3(), example_inputs=3)
    with pytest.raises(ValueError, match="'example_inputs' parameter of summary is empty"):
        summary(linear_4_3(), example_inputs=())
    with pytest.raises(ValueError, match=r"example_inputs \(5,\).*'example_inputs'.*mat1 and mat2"):
        summary(linear_4_3(), example_inputs=torch.ones(2, 5))


# --------------------------------------------------------------------------- operations counted


def test_depthwise_and_transposed_conv_flops_by_hand():
    # depthwise Conv2d(4, 4, 3, groups=4, padding=1) on (4, 5, 5): W 4·1·3·3 = 36, P = 25
    #   dense = 2·36·25 + 4·25 = 1900; filter 0 zeroed (9 weights): remaining = 2·27·25 + 4·25 = 1450
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1))
    with torch.no_grad():
        depthwise[0].weight[0].zero_()
        depthwise[0].bias.fill_(1.0)
    assert count_flops(depthwise, (4, 5, 5))["0"] == FlopCount(1900, 1450)
    # ConvTranspose2d(2, 3, 2, stride=2) on (2, 3, 3): each of the 9 input positions meets every
    # weight once: 2·(2·3·2·2)·9 = 432 MACs·2; bias: one add per output element, 3·6·6 = 108
    transposed = nn.Sequential(nn.ConvTranspose2d(2, 3, 2, stride=2))
    assert count_flops(transposed, (2, 3, 3))["0"].dense == 432 + 108


def test_multihead_attention_by_hand_with_and_without_weights():
    # E = 8, 2 heads of 4, T = 5 tokens, one sample:
    #   in_proj 2·5·24·8 + 24·5 = 2040; QKᵀ and AV 2·2·5·5·(4 + 4) = 800 → the attention row 2840
    #   out_proj (applied functionally, counted on its own row) 2·5·8·8 + 8·5 = 680
    class SelfAttention(nn.Module):
        def __init__(self, need_weights):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.need_weights = need_weights

        def forward(self, x):
            return self.attn(x, x, x, need_weights=self.need_weights)[0]

    for need_weights in (False, True):  # fused SDPA kernel vs explicit bmm
        torch.manual_seed(0)
        model = SelfAttention(need_weights)
        rows = {row.name: row for row in summary(model, (5, 8)).rows}
        assert rows["attn"].flops_dense == 2840 and rows["attn.out_proj"].flops_dense == 680
        assert rows["attn"].prunable == 24 * 8 and rows["attn.out_proj"].prunable == 64
        # MultiheadAttention initialises its biases to 0: their 24·5 adds are free
        assert rows["attn"].flops == 2840 - 120 and rows["attn.out_proj"].flops == 680 - 40
        with torch.no_grad():
            model.attn.in_proj_weight[:8].zero_()  # the query block: 64 zeros at 5 tokens
        assert summary(model, (5, 8)).rows[0].flops == 2840 - 120 - 2 * 5 * 64


def test_a_product_of_two_weights_against_brute_force():
    class WeightProduct(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.randn(3, 4))
            self.b = nn.Parameter(torch.randn(4, 5))

        def forward(self, x):
            return x @ (self.a @ self.b)  # the root runs both products functionally

    torch.manual_seed(0)
    model = WeightProduct()
    with torch.no_grad():
        model.a[torch.rand(3, 4) < 0.5] = 0.0
        model.b[torch.rand(4, 5) < 0.5] = 0.0
    # a @ b skips every MAC with a zero factor; x (1, 3) @ (3, 5) is x times a non-weight: dense
    macs = sum(1 for i in range(3) for k in range(4) for j in range(5) if model.a[i, k] != 0 and model.b[k, j] != 0)
    flops = count_flops(model, (3,))[""]
    assert flops == FlopCount(2 * 60 + 2 * 15, 2 * macs + 2 * 15)


def test_uncounted_fused_operations_warn():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return torch.addr(torch.zeros(3, 3), self.u, x[0])

    with pytest.warns(RuntimeWarning, match="aten.addr in \\(root\\)"):
        summary(Outer(), (3,))


def test_fast_path_setting_and_hooks_are_restored():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1, enable_nested_tensor=False)
    assert torch.backends.mha.get_fastpath_enabled()
    summary(model, (4, 8))
    assert torch.backends.mha.get_fastpath_enabled() and own_hooks_empty(model)


def test_parameters_in_one_flat_buffer_are_told_apart():
    # as cuDNN's flattened RNN weights: two weights are views of one storage at different offsets
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
            buffer = torch.randn(32)
            with torch.no_grad():
                self.first.weight.set_(buffer.untyped_storage(), 0, (4, 4), (4, 1))
                self.second.weight.set_(buffer.untyped_storage(), 16, (4, 4), (4, 1))

        def forward(self, x):
            return x @ self.second.weight.t() + self.first(x)  # second's weight used functionally

    model = Flat()
    assert model.first.weight.untyped_storage().data_ptr() == model.second.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        model.first.weight.zero_()
    flops = count_flops(model, (4,))
    # each product 2·16 = 32 dense; first's zeros are free, second's row is not discounted by them
    assert flops["first"] == FlopCount(32, 0) and flops["second"] == FlopCount(32, 32)
