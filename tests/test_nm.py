"""N:M semi-structured sparsity: nm_keep against brute force, at most N non-zeros in every run
of M for each score-based criterion and scope, the conv and HF Conv1D orders, gradual schedules,
summary's pattern column, the storage formula by hand, the model file's round trip and its
bounds checks, clear errors."""

import itertools

import pytest
import torch
from helpers import Conv1D, rewrite_header
from torch import nn

from prunelab import export
from prunelab.metrics import summary
from prunelab.metrics.storage import storage_bits
from prunelab.pruning import Pruner, prune
from prunelab.pruning.granularity import (
    NMGranularity,
    make_granularity,
    nm_column_order,
    nm_keep,
    nm_pattern,
    nm_unview,
    nm_view,
)
from prunelab.pruning.targets import resolve_targets


class Net(nn.Module):
    """A conv (8 input channels), a grouped conv (8 per group), an HF Conv1D and a Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.proj = Conv1D(8, 16, scale=0.3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.conv(x))))
        return self.fc(torch.relu(self.proj(h.mean(dim=(2, 3)))))


def _net(seed=0):
    torch.manual_seed(seed)
    return Net()


def _data(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, 5, 5, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def _run_counts(target, m):
    """Non-zeros per run of m, read straight from the weight in the documented order."""
    w = target.weight.detach()
    if target.layout == "conv":  # m consecutive input channels, one kernel position
        runs = w.permute(0, 2, 3, 1).reshape(w.shape[0], w.shape[2], w.shape[3], -1, m)
    elif target.layout == "transposed":  # m consecutive inputs of an output column
        runs = w.t().reshape(w.shape[1], -1, m)
    else:
        runs = w.reshape(w.shape[0], -1, m)
    return (runs != 0).sum(dim=-1)


def test_nm_keep_is_the_brute_force_best_n_of_every_run():
    g = torch.Generator().manual_seed(0)
    for n, m in [(1, 2), (2, 4), (3, 4), (4, 8), (2, 3)]:
        scores = torch.rand(5, 4 * m, generator=g)
        alive = torch.rand(5, 4 * m, generator=g) > 0.25
        keep = nm_keep(scores, n, m, alive)
        for r, start in itertools.product(range(5), range(0, 4 * m, m)):
            run = slice(start, start + m)
            best, choice = -1.0, None
            for kept in itertools.combinations(range(m), min(n, int(alive[r, run].sum()))):
                if all(alive[r, start + j] for j in kept):
                    total = sum(float(scores[r, start + j]) for j in kept)
                    if total > best:
                        best, choice = total, kept
            expected = torch.zeros(m, dtype=torch.bool)
            expected[list(choice)] = True
            assert torch.equal(keep[r, run], expected), (n, m, r, start)


@pytest.mark.parametrize("criterion", ["magnitude", "gradient", "wanda", "random", "obd"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_every_run_holds_exactly_n_for_each_criterion(criterion, pattern):
    n, m = map(int, pattern.split(":"))
    model = _net()
    pruner = prune(model, None, criterion=criterion, granularity=pattern, data=_data())
    assert abs(pruner.sparsity() - (1 - n / m)) < 1e-9
    for target in pruner.targets:
        counts = _run_counts(target, m)
        assert torch.all(counts == n), f"{target.name}: runs with {counts.unique().tolist()} non-zeros"
        assert torch.equal(pruner.mask(target.name), target.weight.detach() != 0)


def test_magnitude_keeps_the_largest_of_each_run_along_input_channels_of_a_conv():
    model = _net(1)
    weight = model.conv.weight.detach().clone()
    prune(model, 0.5, granularity="2:4", layers=["conv"])
    runs = weight.abs().permute(0, 2, 3, 1).reshape(-1, 4)
    kept = (model.conv.weight.detach() != 0).permute(0, 2, 3, 1).reshape(-1, 4)
    top = torch.zeros_like(kept).scatter_(1, runs.topk(2, dim=1).indices, True)
    assert torch.equal(kept, top)


@pytest.mark.parametrize("scope", ["local", "global", "layerwise-constant", "row"])
def test_every_scope_ends_at_the_pattern(scope):
    model = _net(2)
    pruner = prune(model, 0.5, granularity="2:4", scope=scope, data=_data())
    for target in pruner.targets:
        assert torch.all(_run_counts(target, 4) == 2), target.name


def test_a_gradual_schedule_prunes_within_the_pattern_and_ends_at_it():
    model = _net(3)
    pruner = Pruner(model, None, granularity="2:4", schedule="agp", schedule_args={"n_prunes": 4, "every": 1})
    pruner.update()
    while not pruner.done:
        pruner.step()
        for target in pruner.targets:  # never more than m − n of a run gone on the way
            assert torch.all(_run_counts(target, 4) >= 2)
    levels = [r.sparsity for r in pruner.history]
    assert levels == sorted(levels) and abs(levels[-1] - 0.5) < 1e-9
    for target in pruner.targets:
        assert torch.all(_run_counts(target, 4) == 2)


def test_an_uneven_earlier_mask_still_ends_with_at_most_n_per_run():
    model = _net(4)
    first = Pruner(model, 0.6, granularity="weight", scope="global")
    first.update()
    second = Pruner(model, None, granularity="2:4")
    second.load_state_dict({**first.state_dict(), "step_count": 0, "next_event": 0})
    second.update()
    for target in second.targets:
        counts = _run_counts(target, 4)
        assert torch.all(counts <= 2), target.name
        assert torch.all(second.mask(target.name) <= first.mask(target.name))  # dead stays dead


def test_nm_view_and_column_order_follow_the_layouts():
    model = _net(5)
    for target in resolve_targets(model):
        w = target.weight.detach()
        view = nm_view(w, target.layout)
        assert torch.equal(nm_unview(view, tuple(w.shape), target.layout), w)
        assert torch.equal(target.matrix()[:, nm_column_order(target)], view)
    conv = model.conv.weight.detach()
    assert torch.equal(nm_view(conv, "conv")[3, :8], conv[3, :, 0, 0])  # channels first, position (0, 0)


def test_summary_reports_the_pattern_per_layer():
    model = _net(6)
    x = torch.randn(1, 8, 5, 5)
    assert "N:M" not in str(summary(model, example_inputs=x))
    prune(model, None, granularity="4:8", layers=["conv", "proj"])
    prune(model, None, granularity="2:4", layers=["grouped"])
    with torch.no_grad():
        model.fc.weight[0, :4] = 0  # unstructured: a run of 4 emptied, others full
    result = summary(model, example_inputs=x)
    patterns = {row.name: row.pattern for row in result.rows}
    assert patterns == {"conv": "4:8", "grouped": "2:4", "proj": "4:8", "fc": None}
    assert result.total.pattern == "mixed"
    assert "N:M" in str(result) and "4:8" in result.to_markdown()
    assert result.to_dict()["rows"][0]["pattern"] == "4:8"


def test_nm_pattern_is_tight():
    w = torch.zeros(4, 16)
    w[:, ::4] = 1.0  # one in every run of 4: 1:4 (and 2:8, the same density)
    assert nm_pattern(w, "linear") == (1, 4)
    w[0, 1] = 1.0  # one run of 4 holds 2: 2:4 holds, but most runs hold 1 (mean 17/16): not tight
    assert nm_pattern(w, "linear") is None
    w[:, 1::4] = 1.0  # now every run of 4 holds 2
    assert nm_pattern(w, "linear") == (2, 4)
    g = torch.Generator().manual_seed(0)
    unstructured = torch.randn(64, 64, generator=g) * (torch.rand(64, 64, generator=g) > 0.9)
    assert nm_pattern(unstructured, "linear") is None
    assert nm_pattern(torch.randn(8, 8), "embedding") is None


def test_storage_of_a_small_2_4_layer_by_hand(tmp_path):
    layer = nn.Linear(8, 4, bias=False)
    prune(layer, None, granularity="2:4")
    # 32 weights = 8 runs of 4; each run: 2 values of 32 bits + 2 positions of log2(4) = 2 bits → 68 bits
    assert storage_bits(layer.weight, 32, 4, nm=(2, 4))["nm"] == 8 * 68
    assert summary(layer, (8,)).total.bytes_best == 8 * 68 // 8 == 68
    report = export.save(layer, tmp_path / "l.plm")
    assert [(t.encoding, t.bytes) for t in report.tensors] == [("nm", 68)]
    # 4:8 with float16 values: 4 runs of 8, each 4 · (16 + 3) bits = 76 → 304 bits = 38 bytes
    layer = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        layer.weight[:, 4:] = 0  # kept: inputs 0-3 of every row (4:8, neither 2:4 nor 1:2)
    assert nm_pattern(layer.weight, "linear") == (4, 8)
    report = export.save(layer, tmp_path / "h.plm", encoding="nm", values="float16")
    assert [(t.encoding, t.bytes) for t in report.tensors] == [("nm", 38)]


@pytest.mark.parametrize("values", ["float32", "float16", "int8"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "1:2"])
def test_save_and_load_are_bit_identical(tmp_path, pattern, values):
    model = _net(7)
    prune(model, None, granularity=pattern, data=_data(1))
    reference = _net(7)
    export.save(model, tmp_path / "dense-ref.plm", encoding="dense", values=values)
    export.load(tmp_path / "dense-ref.plm", model=reference)  # what these values become, stored plainly
    report = export.save(model, tmp_path / "m.plm", encoding="nm", values=values)
    assert report.payload_bytes == report.predicted_bytes
    assert {t.name: t.encoding for t in report.tensors if t.name.endswith("weight")} == {
        "conv.weight": "nm",
        "grouped.weight": "nm",
        "proj.weight": "nm",
        "fc.weight": "nm",
    }
    loaded = export.load(tmp_path / "m.plm", model=_net(8))
    for (name, a), b in zip(reference.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
        # bit for bit, up to the sign of zero: pruned entries come back +0.0 (as from bitmask and CSR)
        assert (a + 0.0).numpy().tobytes() == b.numpy().tobytes(), name


def _entry(header, name):
    return next(e for e in header["tensors"] if e["name"] == name)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda e: e.update(m=1 << 20), "needs 0 < n < m"),
        (lambda e: e.update(n=4), "needs 0 < n < m"),
        (lambda e: e.update(n=1), "bytes for"),
        (lambda e: e.update(m=8), "bytes for|runs of"),
        (lambda e: e.update(layout="embedding"), "layout"),
        (lambda e: e.update(shape=[4096, 4096]), "bytes for|larger|shape"),
    ],
)
def test_crafted_nm_headers_are_refused_before_allocation(tmp_path, edit, message):
    layer = nn.Linear(8, 4, bias=False)
    prune(layer, None, granularity="2:4")
    path = tmp_path / "l.plm"
    export.save(layer, path)
    rewrite_header(path, lambda h: edit(_entry(h, "weight")))
    with pytest.raises(export.ModelFileError, match=message):
        export.load(path, model=nn.Linear(8, 4, bias=False))


def test_repeated_or_out_of_range_positions_are_refused(tmp_path):
    layer = nn.Linear(3, 2, bias=False)  # 2:3: positions of 2 bits, 3 is out of range
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 4.0]]))
    path = tmp_path / "l.plm"
    blob = export._encode_nm(layer.weight.detach().numpy().reshape(-1), (2, 3), (2, 3, "linear"))
    decoded = export._decode_nm(
        blob, {"n": 2, "m": 3, "layout": "linear"}, layer.weight.detach().numpy().dtype, (2, 3), "test"
    )
    assert decoded.tolist() == [1.0, 2.0, 0.0, 0.0, 3.0, 4.0]
    values, positions = blob[:16], export._pack(torch.tensor([0, 3, 1, 2]).numpy(), 2)
    with pytest.raises(export.ModelFileError, match="positions"):
        export._decode_nm(values + positions, {"n": 2, "m": 3, "layout": "linear"}, decoded.dtype, (2, 3), "test")
    positions = export._pack(torch.tensor([1, 1, 1, 2]).numpy(), 2)
    with pytest.raises(export.ModelFileError, match="repeated"):
        export._decode_nm(values + positions, {"n": 2, "m": 3, "layout": "linear"}, decoded.dtype, (2, 3), "test")
    assert not path.exists()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sparsity": 0.3}, r"must be None or 0.5 \(= 1 - 2/4\) with granularity '2:4'. Got 0.3"),
        ({"sparsity": {"fc": 0.5}}, "cannot give per-layer targets"),
        ({"granularity": "4:4"}, "0 < N < M"),
        ({"granularity": "0:4"}, "0 < N < M"),
        ({"granularity": "3:2"}, "0 < N < M"),
        ({"granularity": "2:5"}, r"'conv.weight' \(Conv2d\): it has 8 input channels per group, not a multiple of M=5"),
        ({"granularity": "2:3", "layers": ["fc"]}, r"'fc.weight' \(Linear\): it has 8 inputs per output row"),
        ({"granularity": "2:4", "scope": "row", "layers": ["emb"]}, "does not apply to 'emb.weight'"),
        ({"granularity": "2:x"}, "An N:M pattern is given as 'N:M'"),
    ],
)
def test_clear_errors(kwargs, message):
    model = _net()
    model.emb = nn.Embedding(10, 8)
    kwargs = {"sparsity": None, "granularity": "2:4", **kwargs}
    with pytest.raises(ValueError, match=message):
        prune(model, kwargs.pop("sparsity"), **kwargs)


def test_a_pruner_with_a_ready_schedule_must_agree_with_the_pattern():
    from prunelab.pruning import make_schedule

    with pytest.raises(ValueError, match="disagrees with the schedule"):
        Pruner(_net(), schedule=make_schedule("one-shot", 0.6), granularity="2:4")
    pruner = Pruner(_net(), schedule=make_schedule("one-shot", 0.5), granularity="2:4")
    assert isinstance(pruner.granularity, NMGranularity) and (pruner.granularity.n, pruner.granularity.m) == (2, 4)
    assert make_granularity(" 4 : 8 ").name == "4:8"


def test_a_conv_entry_relabelled_as_another_layout_is_refused(tmp_path):
    conv = nn.Conv2d(4, 2, 3, bias=False)
    prune(conv, None, granularity="2:4")
    path = tmp_path / "c.plm"
    export.save(conv, path, encoding="nm")
    assert export.read_header(path)["tensors"][0]["layout"] == "conv"
    rewrite_header(path, lambda h: _entry(h, "weight").update(layout="transposed"))
    with pytest.raises(export.ModelFileError, match="layout 'transposed' for shape"):
        export.load(path, model=nn.Conv2d(4, 2, 3, bias=False))


def test_a_pruner_refuses_per_layer_targets_with_n_m():
    with pytest.raises(ValueError, match="cannot give per-layer targets with granularity '2:4'"):
        Pruner(_net(), {"conv": 0.5, "grouped": 0.5, "proj": 0.5, "fc": 0.5}, granularity="2:4")
