"""Compressed model files: round trips, sizes against the storage formulas, integrity, safe loading."""

import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from helpers import LANGUAGE_MODELS, rewrite_header

import prunelab
from prunelab import export, units
from prunelab.models import MODELS

SHAPES = {"vgg11": (3, 32, 32), **{name: (12,) for name in LANGUAGE_MODELS}}
OPTIONS = {"vgg11": {"width": 0.25}, "gpt": {"d_model": 16, "n_layers": 2, "n_heads": 2}, "lstm-lm": {"d_model": 16}}
VOCAB = 10  # the classes of the image models, the vocabulary of the language models


def registry_model(name: str, **kw):
    return prunelab.build_model(
        name, input_shape=SHAPES.get(name, (1, 28, 28)), n_classes=VOCAB, seed=0, **{**OPTIONS.get(name, {}), **kw}
    )


def inputs(model, n: int, seed: int = 0):
    """``n`` random inputs for ``model``: images, or token ids for a language model."""
    g = torch.Generator().manual_seed(seed)
    shape = model.config["input_shape"]
    if model.config["name"] in LANGUAGE_MODELS:
        return torch.randint(0, VOCAB, (n, *shape), generator=g)
    return torch.randn(n, *shape, generator=g)


def pruned(name: str, sparsity: float = 0.9):
    model = registry_model(name)
    prunelab.prune(model, sparsity, scope="global")
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        model.train()  # give the running statistics real values
        with torch.no_grad():
            model(torch.randn(8, *model.config["input_shape"]))
    return model.eval()


def outputs(model, seed: int = 0):
    with torch.no_grad():
        return model.eval()(inputs(model, 5, seed))


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("encoding", ["auto", "dense", "bitmask", "csr"])
def test_pruned_registry_models_round_trip_exactly_in_every_encoding(tmp_path, name, encoding):
    model = pruned(name)
    report = export.save(model, tmp_path / "m.plm", encoding=encoding)
    back = prunelab.load(tmp_path / "m.plm")
    assert type(back) is type(model)
    for key, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    assert torch.equal(outputs(back), outputs(model))
    assert report.file_bytes == (tmp_path / "m.plm").stat().st_size
    assert report.payload_bytes == report.predicted_bytes
    if encoding != "auto":
        floating = [t for t in report.tensors if t.values in export.VALUES]
        assert {t.encoding for t in floating} == {encoding}


def test_payload_equals_the_summarys_storage_prediction_and_the_file_is_within_a_few_percent(tmp_path):
    model = pruned("lenet-300-100", 0.95)
    stats = prunelab.summary(model, (1, 28, 28), index_bits="auto").total
    report = export.save(model, tmp_path / "m.plm")
    assert report.payload_bytes == stats.bytes_best
    assert report.file_bytes <= 1.03 * stats.bytes_best
    dense = io.BytesIO()
    torch.save(model.state_dict(), dense)
    assert report.file_bytes <= 0.12 * len(dense.getvalue())  # the target at 95 %
    forced = export.save(model, tmp_path / "csr.plm", encoding="csr", index_bits=4)
    assert forced.payload_bytes == prunelab.summary(model, (1, 28, 28)).total.bytes_csr
    assert report.file_bytes < export.save(model, tmp_path / "r4.plm", index_bits=4).file_bytes


@pytest.mark.parametrize("values, tolerance", [("float16", 2e-3), ("int8", 2e-2)])
def test_reduced_precision_keeps_the_sparsity_pattern_and_stays_within_tolerance(tmp_path, values, tolerance):
    model = pruned("lenet-300-100", 0.9)
    with torch.no_grad():
        model.fc1.weight[0, :5] = torch.tensor([1e-9, -1e-9, 0.0, 3.0, -3.0])  # tiny values must not vanish
    report = export.save(model, tmp_path / "m.plm", values=values)
    back = prunelab.load(tmp_path / "m.plm")
    for key, tensor in model.state_dict().items():
        got = back.state_dict()[key]
        assert torch.equal(got != 0, tensor != 0), key
        if key.endswith("bias"):
            assert torch.equal(got, tensor)  # biases stay exact
        else:
            rows = tensor.abs().amax(dim=1, keepdim=True)
            assert ((got - tensor).abs() <= tolerance * rows + 1e-7).all(), key
    assert report.payload_bytes == report.predicted_bytes
    reference = outputs(model)
    assert (outputs(back) - reference).abs().max() <= 5 * tolerance * reference.abs().max()


def test_int8_at_95_percent_is_at_most_4_percent_of_the_dense_torch_file(tmp_path):
    model = pruned("lenet-300-100", 0.95)
    dense = io.BytesIO()
    torch.save(model.state_dict(), dense)
    report = export.save(model, tmp_path / "m.plm", values="int8")
    assert report.file_bytes <= 0.04 * len(dense.getvalue())


def test_int8_scales_are_per_output_channel():
    w = torch.tensor([[1.0, -0.25, 0.0], [0.032, 0.064, -0.127]])
    q, scale = export._quantised("w", w, "int8")
    assert np.allclose(scale, [1.0 / 127, 0.001])
    assert q.reshape(2, 3).tolist() == [[127, -32, 0], [32, 64, -127]]


def test_csr_bridges_long_gaps_with_fillers_exactly_as_the_storage_formula_counts():
    flat = np.zeros(100, dtype=np.float32)
    flat[[0, 1, 40, 99]] = [1.0, 2.0, 3.0, 4.0]
    blob, entries = export._encode(flat, "csr", 4)
    # gaps 0, 0, 38 (2 fillers of 16), 58 (3 fillers): 4 values + 5 fillers
    assert entries == 9 == 4 + prunelab.metrics.storage.csr_fillers(torch.from_numpy(flat), 4)
    assert len(blob) == 9 * 4 + 5  # values + 9 packed 4-bit counts
    entry = {"encoding": "csr", "index_bits": 4, "entries": entries}
    assert np.array_equal(export._decode(blob, entry, np.dtype(np.float32), 100, "t"), flat)


def test_thinned_models_rebuild_from_the_registry_config_and_the_stored_shapes(tmp_path):
    model = registry_model("mlp", hidden=[50, 40])
    with torch.no_grad():
        model.fc1.weight[:20] = 0
        model.fc1.bias[:20] = 0
    small = units.thin(model, {"fc1": torch.arange(20)}, input_shape=(1, 28, 28))
    assert small.fc1.weight.shape == (30, 784)
    export.save(small, tmp_path / "thin.plm")
    back = prunelab.load(tmp_path / "thin.plm")
    assert back.fc1.weight.shape == (30, 784) and back.fc2.weight.shape == (40, 30)
    assert torch.equal(outputs(back), outputs(small))


def test_thinned_conv_net_round_trips(tmp_path):
    model = registry_model("lenet5")
    with torch.no_grad():
        model.conv2.weight[:10] = 0
    small = units.thin(model, {"conv2": torch.arange(10)}, input_shape=(1, 28, 28))
    export.save(small, tmp_path / "thin.plm")
    back = prunelab.load(tmp_path / "thin.plm")
    assert back.conv2.out_channels == 40
    assert torch.equal(outputs(back), outputs(small))


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registry_model_thinned_round_trips(tmp_path, name):
    model = pruned(name)
    shape = None if name in LANGUAGE_MODELS else model.config["input_shape"]
    example = inputs(model, 2) if name in LANGUAGE_MODELS else None
    found = units.Units.of(model, shape, example)
    with torch.no_grad():  # kill the first half of every unit layer's units
        for layer in found.layers:
            if isinstance(layer.module, torch.nn.Embedding):  # its units are the embedding's columns
                layer.module.weight[:, : layer.n_units // 2] = 0
            else:
                layer.module.weight[: layer.n_units // 2] = 0
    plan = units.zero_units(model, shape, example)
    assert plan
    small = units.thin(model, plan, input_shape=shape, example_inputs=example).eval()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    export.save(small, tmp_path / "thin.plm")
    back = prunelab.load(tmp_path / "thin.plm")
    for key, tensor in small.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    assert torch.equal(outputs(back), outputs(small))


@pytest.mark.parametrize("name", MODELS.names())
def test_hashed_models_round_trip_and_store_only_their_buckets(tmp_path, name):
    model = registry_model(name, hashed=0.125)
    report = export.save(model, tmp_path / "h.plm")
    back = prunelab.load(tmp_path / "h.plm")
    assert torch.equal(outputs(back), outputs(model))
    params = dict(model.named_parameters())
    stored = sum(np.prod(t.shape) for t in report.tensors if t.name in params)
    assert stored == sum(p.numel() for p in params.values())  # buckets, not virtual weights


def test_models_outside_the_registry_need_a_model_to_load_into(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    export.save(model, tmp_path / "plain.plm", metadata={"note": "hand-built"})
    with pytest.raises(ValueError, match="not a registry model.*model="):
        prunelab.load(tmp_path / "plain.plm")
    target = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    back = prunelab.load(tmp_path / "plain.plm", model=target)
    assert back is target and torch.equal(back[0].weight, model[0].weight)
    assert export.read_header(tmp_path / "plain.plm")["metadata"] == {"note": "hand-built"}
    wrong = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 6\) in the file but \(3, 6\)"):
        prunelab.load(tmp_path / "plain.plm", model=wrong)


def test_integer_buffers_survive(tmp_path):
    model = pruned("vgg11")
    export.save(model, tmp_path / "v.plm")
    back = prunelab.load(tmp_path / "v.plm")
    assert back.state_dict()["features.1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(back.state_dict()["features.1.running_mean"], model.state_dict()["features.1.running_mean"])


# --------------------------------------------------------------------------- damaged files


def saved_file(tmp_path):
    path = tmp_path / "m.plm"
    export.save(pruned("mlp"), path)
    return path, path.read_bytes()


def test_a_flipped_weight_byte_is_detected_by_the_checksum(tmp_path):
    path, data = saved_file(tmp_path)
    damaged = bytearray(data)
    damaged[-10] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(export.ModelFileError, match="checksum mismatch"):
        prunelab.load(path)


def test_an_edited_header_is_detected(tmp_path):
    path, data = saved_file(tmp_path)
    path.write_bytes(data.replace(b'"hidden":[100]', b'"hidden":[101]'))
    with pytest.raises(export.ModelFileError, match="checksum mismatch"):
        prunelab.load(path)


@pytest.mark.parametrize("keep", [5, 20, -100])
def test_a_truncated_file_says_truncated(tmp_path, keep):
    path, data = saved_file(tmp_path)
    path.write_bytes(data[:keep])
    with pytest.raises(export.ModelFileError, match="truncated"):
        prunelab.load(path)


def test_not_a_model_file_and_missing_files(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(export.ModelFileError, match="not a prunelab model file"):
        prunelab.load(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="no model file"):
        prunelab.load(tmp_path / "absent.plm")


def test_a_consistent_but_mismatched_file_is_refused(tmp_path):
    """A file re-signed after its architecture was changed: the tensors no longer fit."""
    path, data = saved_file(tmp_path)
    (head_len,) = struct.unpack("<I", data[9:13])
    header = json.loads(data[13 : 13 + head_len])
    payload = data[13 + head_len :]
    header.pop("sha256")
    header["architecture"]["hidden"] = [100, 50]
    core = export._header_bytes(header)
    import hashlib

    header["sha256"] = hashlib.sha256(core + payload).hexdigest()
    head = export._header_bytes(header)
    path.write_bytes(export.MAGIC + struct.pack("<BI", 1, len(head)) + head + payload)
    with pytest.raises(export.ModelFileError, match="missing.*fc3"):
        prunelab.load(path)


# --------------------------------------------------------------------------- torch files, safely


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file on unpickling


def test_loading_a_torch_file_crafted_to_run_code_does_not_run_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(str(marker))}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(export.ModelFileError, match="refused"):
        prunelab.load(path)
    assert not marker.exists()


def test_a_raw_pickle_with_code_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(export.ModelFileError):
        prunelab.load(path)
    assert not marker.exists()


def test_torch_files_of_prunelab_prune_save_load(tmp_path):
    model = pruned("mlp")
    path = tmp_path / "m.pt"
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)
    back = prunelab.load(path)
    assert torch.equal(outputs(back), outputs(model))


# --------------------------------------------------------------------------- bad arguments, ONNX


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"encoding": "coo"}, r"unknown encoding 'coo'.*auto, dense, bitmask, csr"),
        ({"values": "int4"}, r"unknown values 'int4'.*float32, float16, int8"),
        ({"index_bits": 0}, r"index_bits"),
        ({"metadata": {"f": object()}}, r"JSON"),
    ],
)
def test_bad_save_arguments_fail_before_writing(tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        export.save(pruned("mlp"), tmp_path / "m.plm", **kwargs)
    assert not (tmp_path / "m.plm").exists()


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        export.save(pruned("mlp"), tmp_path / "m.plm")
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_of_a_thinned_model_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = registry_model("lenet5")
    with torch.no_grad():
        model.conv1.weight[:8] = 0
    small = units.thin(model, {"conv1": torch.arange(8)}, input_shape=(1, 28, 28)).eval()
    path = export.export_onnx(small, tmp_path / "small.onnx", (1, 28, 28))
    session = ort.InferenceSession(str(path))
    x = torch.randn(3, 1, 28, 28)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, small(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01, 0.001])
def test_best_index_bits_is_the_smallest_csr_over_all_widths(density):
    from prunelab.metrics import best_index_bits, storage_bits

    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 200, generator=g) * (torch.rand(300, 200, generator=g) < density)
    sizes = {r: storage_bits(w, 8, r)["csr"] for r in range(1, 17)}
    best = best_index_bits(w, 8)
    assert sizes[best] == min(sizes.values()) and best == min(r for r in sizes if sizes[r] == sizes[best])
    assert storage_bits(w, 8, "auto")["csr"] == sizes[best]


def test_a_sparsified_model_is_saved_as_the_model_it_came_from(tmp_path):
    from prunelab.sparse import SparseLinear, sparsify

    model = pruned("lenet-300-100", 0.95)
    fast, _ = sparsify(model, (1, 28, 28), min_sparsity=0.5, only_if_faster=False)
    assert any(isinstance(m, SparseLinear) for m in fast.modules())
    export.save(model, tmp_path / "a.plm")
    export.save(fast, tmp_path / "b.plm")
    assert (tmp_path / "a.plm").read_bytes() == (tmp_path / "b.plm").read_bytes()


@pytest.mark.parametrize("encoding", ["dense", "bitmask", "csr"])
def test_a_huge_declared_shape_is_refused_before_anything_is_allocated(tmp_path, encoding):
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight[0] = 0
    export.save(model, tmp_path / "m.plm", encoding=encoding)

    def enlarge(header):
        entry = next(e for e in header["tensors"] if e["name"] == "weight")
        entry["shape"] = [2**20, 2**20]  # 4 TiB as float32

    rewrite_header(tmp_path / "m.plm", enlarge)
    message = {
        "dense": r"tensor 'weight'.*48 bytes for 1099511627776 dense values",  # checked against the payload
        "bitmask": r"tensor 'weight'.*34 bytes for a bit-mask of 1099511627776 elements",
        "csr": r"'weight' has shape \(1048576, 1048576\) in the file but \(3, 4\)",
    }[encoding]
    with pytest.raises(export.ModelFileError, match=message):
        prunelab.load(tmp_path / "m.plm", model=torch.nn.Linear(4, 3))


def test_load_resizes_norms_depthwise_and_transposed_convs_of_a_given_model(tmp_path):
    def net(c):
        torch.manual_seed(c)
        return torch.nn.Sequential(
            torch.nn.Conv1d(2, c, 1),
            torch.nn.GroupNorm(2, c),
            torch.nn.Conv1d(c, c, 3, groups=c, padding=1),
            torch.nn.ConvTranspose1d(c, 4, 3),
            torch.nn.RMSNorm(7),
            torch.nn.Linear(7, c),
            torch.nn.LayerNorm(c),
            torch.nn.BatchNorm1d(4),
        )

    small = net(4).eval()
    export.save(small, tmp_path / "small.plm")
    big = prunelab.load(tmp_path / "small.plm", model=net(6))
    assert (big[0].out_channels, big[1].num_channels, big[2].groups, big[3].in_channels) == (4, 4, 4, 4)
    assert (big[5].out_features, big[6].normalized_shape) == (4, (4,))
    x = torch.randn(3, 2, 5)
    assert torch.equal(big(x), small(x))


class _HeadsByName(torch.nn.Module):
    """Attention-like sizes kept as plain attributes under another name (``n_head``, as some
    models and prunelab.units' head thinning use): the forward reshapes by them."""

    def __init__(self):
        super().__init__()
        self.n_head, self.head_dim = 4, 2
        self.proj = torch.nn.Linear(5, 8)

    def forward(self, x):
        return self.proj(x).view(len(x), self.n_head, self.head_dim).pow(2).sum(-1)


def test_n_head_is_saved_and_restored_with_the_thinned_shapes(tmp_path):
    torch.manual_seed(0)
    model = _HeadsByName()
    with torch.no_grad():  # head 2 removed: its two output rows go
        keep = torch.tensor([0, 1, 2, 3, 6, 7])
        model.proj.weight = torch.nn.Parameter(model.proj.weight[keep].clone())
        model.proj.bias = torch.nn.Parameter(model.proj.bias[keep].clone())
        model.n_head = 3
    prunelab.save(model, tmp_path / "m.plm")
    assert export.read_header(tmp_path / "m.plm")["sizes"][""] == {"n_head": 3, "head_dim": 2}
    loaded = prunelab.load(tmp_path / "m.plm", model=_HeadsByName())
    x = torch.randn(3, 5)
    assert loaded.n_head == 3 and torch.equal(loaded(x), model(x))


def test_save_replaces_a_planted_symlink_and_never_writes_through_it(tmp_path):
    # the model file goes to a new random temporary file, renamed into place: a symlink planted at
    # the final name (or at the old predictable temporary name) is never written through
    import os

    from torch import nn

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "model.plm"
    out.symlink_to(victim)
    (tmp_path / f".model.plm.tmp{os.getpid()}").symlink_to(victim)
    model = nn.Sequential(nn.Linear(4, 3))
    export.save(model, out)
    assert victim.read_text() == "keep me"
    assert not out.is_symlink()
    assert torch.equal(export.load(out, model=nn.Sequential(nn.Linear(4, 3)))[0].weight, model[0].weight)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []
    mode = out.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600


def test_tied_weights_are_stored_once_and_load_back_tied(tmp_path):
    # gpt's head is its token embedding: one copy in the file, the same tensor after load
    from prunelab.models import build_model

    model = build_model("gpt", n_classes=50, input_shape=(8,), d_model=16, n_layers=1, n_heads=2, seed=0)
    assert model.lm_head.weight is model.tok_embed.weight
    report = export.save(model, tmp_path / "lm.plm")
    rows = {row.name: row for row in report.tensors}
    assert rows["lm_head.weight"].encoding == "tied" and rows["lm_head.weight"].bytes == 0
    assert rows["tok_embed.weight"].bytes == 50 * 16 * 4
    assert report.payload_bytes == export.predict_bytes(model)
    assert (
        report.payload_bytes
        == prunelab.summary(
            model, example_inputs=torch.zeros(1, 8, dtype=torch.long), index_bits="auto"
        ).total.bytes_best
    )
    loaded = export.load(tmp_path / "lm.plm")
    assert loaded.lm_head.weight is loaded.tok_embed.weight
    tokens = torch.randint(0, 50, (2, 8))
    assert torch.equal(loaded.eval()(tokens), model.eval()(tokens))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e.update(same_as="nowhere.weight"), "is tied to 'nowhere.weight', which is not an earlier stored"),
        (lambda e: e.update(shape=[3, 3]), "is tied to 'tok_embed.weight' but declares another shape or dtype"),
    ],
)
def test_a_tie_to_an_unknown_or_different_tensor_is_refused(tmp_path, edit, message):
    from prunelab.models import build_model

    model = build_model("gpt", n_classes=50, input_shape=(8,), d_model=16, n_layers=1, n_heads=2, seed=0)
    export.save(model, tmp_path / "lm.plm")
    rewrite_header(tmp_path / "lm.plm", lambda h: [edit(e) for e in h["tensors"] if e["name"] == "lm_head.weight"])
    with pytest.raises(export.ModelFileError, match=message):
        export.load(tmp_path / "lm.plm")


@pytest.mark.parametrize(
    "values, value, message",
    [
        ("int8", float("nan"), r"tensor '0.weight' holds 1 non-finite value\(s\) \(first at \(1, 2\): nan\)"),
        ("float16", float("inf"), r"tensor '0.weight' holds 1 non-finite value\(s\)"),
        ("float16", 1e6, r"tensor '0.weight' holds values beyond float16's range \(first at \(1, 2\): 1000000.0"),
    ],
)
def test_reduced_precision_refuses_values_it_cannot_store(tmp_path, values, value, message):
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[1, 2] = value
    with pytest.raises(ValueError, match=message):
        export.save(model, tmp_path / "m.plm", values=values)
    assert not (tmp_path / "m.plm").exists()
    export.save(model, tmp_path / "m.plm")  # float32 keeps it as it is
    loaded = export.load(tmp_path / "m.plm", model=nn.Sequential(nn.Linear(4, 3)))
    assert torch.equal(loaded[0].weight.isnan(), model[0].weight.isnan())
