"""Peak memory and time of loading crafted model files of under 10 KB (issue 18, docs/export.md "Limits").

Each case writes a small file that passes the integrity check (a valid checksum) but declares
sizes meant to make :func:`prunelab.load` allocate or work: a CSR index width of 400 million
bits, a registry architecture of 20000 × 20000 hidden units, a language model with a huge
vocabulary, a Hugging Face config of 8192-wide layers, tensors that are all zero in CSR (a few bytes
for any shape), a deeply nested header, a torch file naming a huge architecture, and — the worst
files the checks let through — architectures at the documented size limit in each encoding.
Every case runs in its own process (address space capped at ``--cap-gib`` above what importing
prunelab takes, so that a case that still allocates fails there instead of taking the machine);
the table gives the file size, the peak resident memory above the baseline after ``import
prunelab`` (``ru_maxrss``), the time of the ``load`` call and how it ended.

    python benchmarks/crafted_files.py [--cases csr-index-bits mlp-20000 ...] [--cap-gib 6]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 10 * 1024


def write_plm(path: Path, architecture, tensors, metadata=None, cls="MLP") -> int:
    """A prunelab model file with a valid checksum: ``tensors`` are ``(entry, blob)`` pairs whose
    offsets are filled in back to back; returns the file size."""
    from prunelab import export

    entries, offset = [], 0
    for entry, blob in tensors:
        entries.append(dict(entry, offset=offset, bytes=len(blob)))
        offset += len(blob)
    payload = b"".join(blob for _, blob in tensors)
    header = {
        "format": "prunelab-model",
        "version": export.VERSION,
        "prunelab": "crafted",
        "architecture": architecture,
        "class": cls,
        "tensors": entries,
        "sizes": {},
        "payload_bytes": len(payload),
        "metadata": metadata or {},
    }
    header["sha256"] = hashlib.sha256(export._header_bytes(header) + payload).hexdigest()
    head = export._header_bytes(header)
    data = export.MAGIC + struct.pack("<BI", export.VERSION, len(head)) + head + payload
    path.write_bytes(data)
    return len(data)


def csr_empty(name, shape, dtype="float32"):
    """An all-zero tensor in CSR: no entries, no bytes, whatever its shape."""
    return {
        "name": name,
        "shape": list(shape),
        "dtype": dtype,
        "values": dtype,
        "encoding": "csr",
        "index_bits": 16,
        "entries": 0,
    }, b""


def dense(name, shape, dtype="float32"):
    n = math.prod(shape)
    return {"name": name, "shape": list(shape), "dtype": dtype, "values": dtype, "encoding": "dense"}, b"\x00" * (4 * n)


def mlp_arch(input_dim, hidden, n_classes):
    return {"name": "mlp", "input_shape": [input_dim], "n_classes": n_classes, "hidden": list(hidden), "seed": 0}


def mlp_tensors(input_dim, hidden, n_classes, weight=csr_empty, bias=csr_empty):
    widths = [input_dim, *hidden, n_classes]
    out = []
    for k, (a, b) in enumerate(zip(widths, widths[1:]), start=1):
        out += [weight(f"fc{k}.weight", (b, a)), bias(f"fc{k}.bias", (b,))]
    return out


def case_csr_index_bits(path):
    entry, _ = csr_empty("weight", (3, 4))
    entry["index_bits"] = 400_000_000
    return write_plm(path, None, [(entry, b""), dense("bias", (3,))], cls="Linear"), "linear"


def case_mlp_20000(path):
    """The architecture of 20000 × 20000 hidden units with one tiny (wrong) tensor."""
    return write_plm(path, mlp_arch(784, [20000, 20000], 10), [dense("fc1.bias", (4,))]), None


def case_mlp_20000_zeros(path):
    """The same architecture with every tensor declared in full, all zero (CSR, no bytes)."""
    return write_plm(path, mlp_arch(784, [20000, 20000], 10), mlp_tensors(784, [20000, 20000], 10)), None


def case_gpt_vocab(path):
    arch = {
        "name": "gpt",
        "input_shape": [16],
        "n_classes": 1_000_000,
        "d_model": 4096,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff": None,
        "dropout": 0.0,
        "tied": True,
        "seed": 0,
    }
    return write_plm(path, arch, [dense("head.bias", (4,))], cls="GPT"), None


def case_gpt_layers(path):
    arch = {
        "name": "gpt",
        "input_shape": [16],
        "n_classes": 10,
        "d_model": 8,
        "n_layers": 1_000_000,
        "n_heads": 1,
        "d_ff": None,
        "dropout": 0.0,
        "tied": True,
        "seed": 0,
    }
    return write_plm(path, arch, [dense("head.bias", (4,))], cls="GPT"), None


def case_hashed_huge(path):
    """A HashedNets MLP of 20000 × 20000 virtual weights in 4 buckets: tiny in parameters, but its
    hash index (one int32 per virtual weight) is computed when the layer is built."""
    arch = dict(mlp_arch(784, [20000, 20000], 10), hashed=1e-8)
    return write_plm(path, arch, [dense("fc1.bias", (4,))]), None


def case_hf_wide(path):
    config = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 8192, "n_layer": 4, "n_head": 8}
    meta = {"huggingface": {"class": "GPT2LMHeadModel", "config_class": "GPT2Config", "config": config}}
    return write_plm(path, None, [dense("lm_head.bias", (4,))], metadata=meta, cls="GPT2LMHeadModel"), None


def case_nested_header(path):
    from prunelab import export

    head = b"[" * 9000
    path.write_bytes(export.MAGIC + struct.pack("<BI", export.VERSION, len(head)) + head)
    return path.stat().st_size, None


def case_torch_arch(path):
    import torch

    torch.save({"config": mlp_arch(784, [20000, 20000], 10), "state_dict": {}}, path)
    return path.stat().st_size, None


def case_torch_storage(path):
    """A torch file whose tensor's storage declares 2^30 elements over a 16-byte record."""
    import zipfile

    import torch

    plain = path.with_suffix(".plain")
    torch.save({"w": torch.zeros(4)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(
                    b"K\x04tq\x07QK\x00K\x04\x85", b"J\x00\x00\x00\x40tq\x07QK\x00J\x00\x00\x00\x40\x85"
                )
            out.writestr(info, data)
    return path.stat().st_size, "linear"


def _carrier(encoding: str, rows: int, cols: int):
    """fc1.weight ``(rows, cols)`` holding about 8 KB of payload in ``encoding`` (all values zero)."""
    import numpy as np

    from prunelab import export

    entry = {"name": "fc1.weight", "shape": [rows, cols], "dtype": "float32", "values": "float32", "encoding": encoding}
    n = rows * cols
    if encoding == "dense":
        return entry, bytes(4 * n)
    if encoding == "bitmask":
        return entry, bytes(export.bits_to_bytes(n))
    if encoding == "csr":
        count = 8000 // 6
        entry.update(index_bits=16, entries=count)
        return entry, bytes(4 * count) + export._pack(np.zeros(count, np.int64), 16)
    runs = n // cols  # nm: 1 of every ``cols`` inputs
    entry.update(n=1, m=cols, layout="linear")
    bits = export.nm_position_bits(cols)
    return entry, bytes(4 * runs) + export._pack(np.zeros(runs, np.int64), bits)


#: fc1 ``(rows, cols)`` per encoding: about 8 KB of payload each.
_CARRIERS = {"dense": (2000, 1), "bitmask": (1000, 64), "csr": (1000, 64), "nm": (1000, 1024)}


def _limit_case(path, encoding):
    """The largest mlp a file of under 10 KB may name: input ``cols``, hidden ``[rows, h]`` with
    fc1.weight carrying the payload in ``encoding`` and every other tensor all zero (CSR, no bytes),
    ``h`` the widest the limit of docs/export.md allows."""
    from prunelab import export

    rows, cols = _CARRIERS[encoding]
    carrier = _carrier(encoding, rows, cols)
    payload = len(carrier[1])
    budget = (export.FREE_BYTES + export.MAX_EXPANSION * payload) // 4  # float32 elements
    fixed = rows * cols + rows + 10 + cols  # fc1, biases, the dry-run input
    h = (budget - fixed) // (rows + 1 + 10)
    tensors = mlp_tensors(cols, [rows, h], 10)
    tensors[0] = carrier
    return write_plm(path, mlp_arch(cols, [rows, h], 10), tensors), None


CASES = {
    "csr-index-bits": case_csr_index_bits,
    "mlp-20000": case_mlp_20000,
    "mlp-20000-zeros": case_mlp_20000_zeros,
    "gpt-vocab": case_gpt_vocab,
    "gpt-layers": case_gpt_layers,
    "hashed-huge": case_hashed_huge,
    "hf-wide": case_hf_wide,
    "nested-header": case_nested_header,
    "torch-arch": case_torch_arch,
    "torch-storage": case_torch_storage,
    **{f"limit-{e}": (lambda path, e=e: _limit_case(path, e)) for e in _CARRIERS},
}


# --------------------------------------------------------------------------- one case, in a child process


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def child(name: str, cap_gib: float) -> dict:
    import torch

    import prunelab

    if name == "hf-wide":
        from transformers import GPT2LMHeadModel  # noqa: F401  (importing the class is not the file's cost)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + int(cap_gib * 2**30), resource.RLIM_INFINITY))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "crafted.plm"
        size, model = CASES[name](path)
        start = time.perf_counter()
        try:
            prunelab.load(path, model=torch.nn.Linear(4, 3) if model == "linear" else None)
            outcome = "loaded"
        except Exception as err:  # what the case ends in is the measurement
            outcome = f"{type(err).__name__}: {str(err)[:110]}"
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"case": name, "file_bytes": size, "peak_mib": peak / 1024, "seconds": seconds, "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--cap-gib", type=float, default=6.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cap_gib)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    print(f"{'case':<16} {'file bytes':>10} {'peak MiB':>9} {'seconds':>8}  outcome")
    for name in args.cases:
        run = subprocess.run(
            [sys.executable, __file__, "--child", name, "--cap-gib", str(args.cap_gib)],
            capture_output=True,
            text=True,
            env=env,
        )
        if run.returncode:
            print(
                f"{name:<16} {'-':>10} {'-':>9} {'-':>8}  process ended with {run.returncode}: "
                f"{run.stderr.strip().splitlines()[-1:]}"
            )
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        flag = "" if r["file_bytes"] < LIMIT else "  (over 10 KB)"
        print(f"{name:<16} {r['file_bytes']:>10,} {r['peak_mib']:>9.1f} {r['seconds']:>8.2f}  {r['outcome']}{flag}")


if __name__ == "__main__":
    main()
