"""Crafted model files are refused before they cost memory or time (issue 18, docs/export.md "Limits").

Every file below passes the integrity check (its checksum is recomputed) but declares a size,
count, index width, shape or architecture that does not fit its payload. They are all loaded in
one child process whose address space is capped at 1.5 GiB above what importing prunelab takes;
each must end in one ModelFileError naming the file and the bad field, with the child's peak
resident memory staying small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import rewrite_header

import prunelab
from prunelab import export

ROOT = Path(__file__).resolve().parents[1]


def _weight(header, name="fc1.weight"):
    return next(e for e in header["tensors"] if e["name"] == name)


def _set(tensor, **fields):
    return lambda h: _weight(h, tensor).update(fields)


def _mlp(zero: bool):
    """A 4-5-3 mlp (registry architecture); with ``zero`` every tensor is all zero, so in CSR each
    takes no payload at all."""
    model = prunelab.build_model("mlp", input_shape=(4,), n_classes=3, hidden=[5], seed=0)
    if zero:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return model


def _grow_architecture(hidden):
    """The all-zero file's architecture and tensor shapes widened to ``hidden``, tensors left empty."""

    def edit(header):
        header["architecture"]["hidden"] = hidden
        widths = [4, *hidden, 3]
        header["tensors"] = [
            dict(header["tensors"][0], name=f"fc{k}.{kind}", shape=shape)
            for k, (a, b) in enumerate(zip(widths, widths[1:]), start=1)
            for kind, shape in (("weight", [b, a]), ("bias", [b]))
        ]

    return edit


def _nested(path: Path) -> None:
    import struct

    head = b"[" * 9000
    path.write_bytes(export.MAGIC + struct.pack("<BI", export.VERSION, len(head)) + head)


def _huge_int(path: Path) -> None:
    import struct

    head = b'{"format": "prunelab-model", "payload_bytes": ' + b"9" * 5000 + b"}"
    path.write_bytes(export.MAGIC + struct.pack("<BI", export.VERSION, len(head)) + head)


def _torch_architecture(path: Path) -> None:
    config = {"name": "mlp", "input_shape": [784], "n_classes": 10, "hidden": [20000, 20000], "seed": 0}
    torch.save({"config": config, "state_dict": {}}, path)


def _gpt(**arch):
    def edit(header):
        header["architecture"] = {
            "name": "gpt",
            "input_shape": [8],
            "n_classes": 10,
            "d_model": 8,
            "n_layers": 1,
            "n_heads": 1,
            "d_ff": None,
            "dropout": 0.0,
            "tied": True,
            "seed": 0,
            **arch,
        }

    return edit


#: name: (how the file is made: (encoding, zero weights, header edit) or a writer, load into a Linear(4, 5)
#: instead of the file's architecture, the message expected).
CASES = {
    "csr-index-bits-huge": (
        ("csr", False, _set("fc1.weight", index_bits=400_000_000)),
        False,
        r"tensor 'fc1.weight'.*CSR index width 400000000 \(needs an int in \[1, 16\]\)",
    ),
    "csr-index-bits-zero": (("csr", False, _set("fc1.weight", index_bits=0)), False, r"CSR index width 0"),
    "csr-index-bits-float": (("csr", False, _set("fc1.weight", index_bits=4.0)), False, r"CSR index width 4.0"),
    "csr-entries-over-numel": (
        ("csr", True, _set("fc1.weight", entries=10**12)),
        False,
        r"'fc1.weight'.*1000000000000 CSR entries for a tensor of 20 elements",
    ),
    "csr-entries-negative": (("csr", True, _set("fc1.weight", entries=-1)), False, r"-1 CSR entries"),
    "csr-bytes-mismatch": (("csr", False, _set("fc1.weight", entries=3)), False, r"bytes for 3 CSR entries"),
    "bitmask-short": (
        ("bitmask", False, _set("fc1.weight", shape=[5, 4000])),
        False,
        r"'fc1.weight'.*bit-mask of 20000 elements \(2500 bytes\)",
    ),
    "dense-huge-shape": (
        ("dense", False, _set("fc1.weight", shape=[2**20, 2**20])),
        False,
        r"'fc1.weight'.*80 bytes for 1099511627776 dense values",
    ),
    "shape-over-limit": (
        ("csr", True, _set("fc1.weight", shape=[2**30, 2**30])),
        False,
        r"'fc1.weight' declares 1152921504606846976 elements, more than the limit",
    ),
    "shape-negative": (
        ("dense", False, _set("fc1.weight", shape=[-5, -4])),
        False,
        r"'fc1.weight' has shape \[-5, -4\]",
    ),
    "shape-float": (("dense", False, _set("fc1.weight", shape=[5.0, 4])), False, r"'fc1.weight' has shape"),
    "shape-too-many-dims": (
        ("csr", True, _set("fc1.weight", shape=[1] * 40)),
        False,
        r"'fc1.weight' has shape .*at most 16 ints",
    ),
    "scales-count": (
        ("dense", False, _set("fc1.weight", scales=10**9)),
        False,
        r"'fc1.weight' has 1000000000 scales for 5 rows",
    ),
    "nm-huge-m": (
        ("dense", False, _set("fc1.weight", encoding="nm", n=1, m=2**40, layout="linear")),
        False,
        r"N:M entry with n=1, m=1099511627776",
    ),
    "unknown-encoding": (("dense", False, _set("fc1.weight", encoding="zip")), False, r"unknown encoding 'zip'"),
    "unknown-dtype": (("dense", False, _set("fc1.weight", dtype="complex1024")), False, r"dtype 'complex1024'"),
    "overlap": (("dense", False, _set("fc1.bias", offset=0)), False, r"tensor bytes overlap at payload offset"),
    "duplicate-name": (
        ("dense", False, _set("fc1.bias", name="fc1.weight")),
        False,
        r"tensor 'fc1.weight' is listed twice",
    ),
    "architecture-too-large": (
        ("csr", True, _grow_architecture([20000, 20000])),
        False,
        r"its architecture needs 1,6\d\d,\d{3},\d{3} bytes of memory, more than the",
    ),
    "architecture-mismatch": (
        ("dense", False, lambda h: h["architecture"].update(hidden=[20000, 20000])),
        False,
        r"the tensors do not match the model: missing \['fc3.bias', 'fc3.weight'\]",
    ),
    "architecture-million-layers": (
        ("dense", False, _gpt(n_layers=10**6)),
        False,
        r"its architecture has more than 272 modules and tensors for the 4 tensors",
    ),
    "architecture-huge-vocabulary": (
        ("dense", False, _gpt(n_classes=10**9, d_model=4096)),
        False,
        r"cannot be built: the .n_classes. parameter of gpt must be an int in \[1, 16777216\]",
    ),
    "architecture-hashed-index": (
        ("dense", False, lambda h: h["architecture"].update(hidden=[20000, 20000], hashed=1e-8)),
        False,
        r"the tensors do not match the model: missing",
    ),
    "nested-header": (_nested, False, r"the header is nested too deeply"),
    "huge-integer": (_huge_int, False, r"the header is not valid JSON"),
    "torch-architecture": (_torch_architecture, False, r"its architecture needs 1,6\d\d,\d{3},\d{3} bytes"),
    "given-model-too-small": (("dense", False, lambda h: None), True, r"the tensors do not match the model"),
}

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path

    def vm():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    import torch
    import prunelab
    from prunelab.export import ModelFileError
    resource.setrlimit(resource.RLIMIT_AS, (vm() + 3 * 2**29, resource.RLIM_INFINITY))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {}
    for name, path, given in json.loads(sys.argv[1]):
        try:
            prunelab.load(path, model=torch.nn.Linear(4, 5) if given else None)
            out[name] = {"error": None}
        except ModelFileError as err:
            out[name] = {"error": str(err)}
        except BaseException as err:               # anything else is the failure the test reports
            out[name] = {"error": f"{type(err).__name__} (not a ModelFileError): {err}"}
        out[name]["peak_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    jobs = []
    for name, (make, given, _) in CASES.items():
        path = folder / f"{name}.plm"
        if callable(make):
            make(path)
        else:
            encoding, zero, edit = make
            export.save(_mlp(zero), path, encoding=encoding, index_bits=4 if encoding == "csr" else "auto")
            rewrite_header(path, edit)
        jobs.append((name, str(path), given))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_a_crafted_file_is_refused_naming_the_file_and_the_field(outcomes, name):
    import re

    error = outcomes[name]["error"]
    assert error is not None, f"{name}: the crafted file loaded"
    assert f"{name}.plm" in error
    assert re.search(CASES[name][2], error), error


def test_no_crafted_file_costs_memory(outcomes):
    """Every refusal comes before the declared sizes are allocated: the child's peak resident memory
    grows by less than 64 MiB over its baseline after importing prunelab (the declared sizes would
    take gigabytes; the address-space cap would turn them into a MemoryError)."""
    worst = max(outcomes.values(), key=lambda r: r["peak_mib"])
    assert worst["peak_mib"] < 64, worst


def test_a_small_file_at_the_size_limit_still_loads(tmp_path):
    """An all-zero model is legitimately a few bytes in CSR; up to the documented limit it loads."""
    model = _mlp(zero=True)
    export.save(model, tmp_path / "zero.plm", encoding="csr")
    header, payload = export._read(tmp_path / "zero.plm")
    assert len(payload) == 0
    loaded = prunelab.load(tmp_path / "zero.plm")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_the_size_limit_counts_the_architecture_against_the_payload(tmp_path):
    """The architecture of an all-zero file may take FREE_BYTES of memory; one float32 element more
    is refused, with the numbers and the way out (load into a model you built)."""
    fits = (export.FREE_BYTES - 4 * 4) // 4  # float32 elements, less the dry-run input
    hidden = (fits - 3) // (4 + 1 + 3)  # 4-h-3: 4h + h + 3h + 3 elements
    for width, ok in ((hidden, True), (hidden + 1, False)):
        export.save(_mlp(zero=True), tmp_path / "z.plm", encoding="csr")
        rewrite_header(tmp_path / "z.plm", _grow_architecture([width]))
        if ok:
            assert prunelab.load(tmp_path / "z.plm")[1].out_features == width
        else:
            with pytest.raises(export.ModelFileError, match=r"pass load\(path, model=\.\.\.\)"):
                prunelab.load(tmp_path / "z.plm")
            given = prunelab.build_model("mlp", input_shape=(4,), n_classes=3, hidden=[width])
            assert prunelab.load(tmp_path / "z.plm", model=given) is given


def _torch_zip_of_wrong_tensors(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), r"a directory, not a weights file"),
        (lambda p: p.write_bytes(bytes(range(256)) * 4), r"neither a prunelab model file nor a torch.save file"),
        (lambda p: p.write_bytes(b""), r"an empty file"),
        (lambda p: p.write_bytes(__import__("pickle").dumps({"a": 1})), r"refused: the file asks to run code"),
        (_torch_zip_of_wrong_tensors, r"the tensors do not match the model: missing \['fc1.bias'.*unexpected \['w'\]"),
        (_nested, r"the header is nested too deeply"),
    ],
    ids=["directory", "garbage", "empty", "pickle", "torch-zip", "crafted-plm"],
)
def test_summary_weights_on_a_bad_file_exits_2_with_one_line(tmp_path, capsys, make, message):
    import re

    from prunelab.cli import main

    path = tmp_path / "weights.bin"
    make(path)
    code = main(["summary", "--model", "mlp", "--dataset", "digits", "--weights", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"prunelab: error: load {str(path)!r}: ") and re.search(message, err), err


def test_a_header_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    export.save(_mlp(zero=False), tmp_path / "m.plm")
    monkeypatch.setattr(export, "MAX_HEADER_BYTES", 64)
    with pytest.raises(
        export.ModelFileError, match=r"m.plm'.*the header declares \d+ bytes, more than the limit of 64"
    ):
        prunelab.load(tmp_path / "m.plm")


def test_thinned_shapes_that_do_not_fit_together_are_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """fc1 thinned to 4 units but fc2 still taking 5 inputs: the meta-device dry run refuses the
    file; the real architecture is never built."""
    export.save(_mlp(zero=False), tmp_path / "m.plm", encoding="csr")

    def thin_fc1(header):
        for entry in header["tensors"]:
            if entry["name"] in ("fc1.weight", "fc1.bias"):
                entry["shape"][0] = 4
                entry["entries"] = 0

    export.save(_mlp(zero=True), tmp_path / "m.plm", encoding="csr")
    rewrite_header(tmp_path / "m.plm", thin_fc1)
    built = []
    real = export._build
    monkeypatch.setattr(
        export, "_build", lambda config, where: built.append(torch.empty(0).is_meta) or real(config, where)
    )
    with pytest.raises(export.ModelFileError, match=r"the stored \(thinned\) shapes do not fit together"):
        prunelab.load(tmp_path / "m.plm")
    assert built == [True]  # the skeleton only: the real model is never built
