"""How many members fit: the engine's R from the memory a batched step needs.

Per member, a training step holds its parameters four times over (weights, gradients, and two
optimiser buffers: SGD's momentum uses one, Adam's moments two) plus a mask, and the outputs of
every layer for its batch (kept for the backward pass, and their gradients). :func:`member_bytes`
counts these from one forward pass on a single input; :func:`choose_members` divides a share of
the free memory (host RAM from ``/proc/meminfo``, or ``torch.cuda.mem_get_info`` on a GPU) by it.
On a CPU, :func:`cache_members` gives the wave size: how many members' steps fit in the
last-level cache, past which a step waits on main memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn

from prunelab._hooks import forward_eval, leaf_modules
from prunelab._validation import BATCH_SIZE, MODEL, N_UNITS, Interval, Shape, Types, validate_params

#: What the memory functions declare about the model they size.
_SIZED: dict[str, list[Any]] = {"model": [MODEL], "input_shape": [Shape()], "batch_size": [BATCH_SIZE]}
_SHARE = Interval(Real, 0, 1, closed="right")
_DEVICE = [Types(str, torch.device), None]

# weights, gradients, two optimiser buffers, mask
PARAMETER_COPIES = 5
# each layer output is kept for the backward pass, and its gradient is made there
ACTIVATION_COPIES = 2


@validate_params(_SIZED)
def member_bytes(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> int:
    """Bytes one member of ``model`` needs in a batched training step at ``batch_size``."""
    batch_size = int(batch_size)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    outputs = []

    def count(module, inputs, output):
        if torch.is_tensor(output):
            outputs.append(output.numel() * output.element_size())

    handles = [m.register_forward_hook(count) for m in leaf_modules(model)]
    parameter = next(model.parameters(), None)
    x = torch.zeros(
        1,
        *input_shape,
        device=parameter.device if parameter is not None else None,
        dtype=parameter.dtype if parameter is not None else None,
    )
    forward_eval(model, [x], handles)
    return PARAMETER_COPIES * params + ACTIVATION_COPIES * batch_size * sum(outputs)


@validate_params({"device": _DEVICE})
def available_bytes(device: torch.device | str | None = None) -> int:
    """Free memory: the GPU's (``torch.cuda.mem_get_info``) for a CUDA device, else the host's
    ``MemAvailable`` (Linux), else total physical memory."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cache_bytes() -> int:
    """Size of the CPU's largest cache (the last level), from Linux's sysfs; 32 MiB when it
    cannot be read."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(root):
            if entry.startswith("index"):
                with open(os.path.join(root, entry, "size")) as f:
                    text = f.read().strip().upper()
                scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
                sizes.append(int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return max(sizes) if sizes else 32 * 2**20


@validate_params({**_SIZED, "share": [_SHARE]})
def cache_members(model: nn.Module, input_shape: Sequence[int], batch_size: int, *, share: float = 1.0) -> int:
    """How many members' training steps fit in ``share`` of the last-level cache (at least 1):
    the wave size of the batched engine on a CPU."""
    return max(1, int(share * cache_bytes()) // member_bytes(model, input_shape, batch_size))


@validate_params(
    {
        **_SIZED,
        "wanted": [N_UNITS],
        "share": [_SHARE],
        "budget_bytes": [Interval(Integral, 1, 1 << 50), None],
        "device": _DEVICE,
    }
)
def choose_members(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    *,
    wanted: int,
    share: float = 0.5,
    budget_bytes: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """The number of members to train at once: ``wanted`` if they fit in ``share`` of the free
    memory (or in ``budget_bytes``), else as many as fit. Raises ValueError, naming the bytes
    needed and available, when not even one member fits."""
    wanted, share = int(wanted), float(share)
    budget = int(share * available_bytes(device)) if budget_bytes is None else int(budget_bytes)
    per_member = member_bytes(model, input_shape, batch_size)
    fit = budget // per_member
    if fit < 1:
        raise ValueError(
            f"one member of {type(model).__name__} at batch {batch_size} needs about "
            f"{per_member / 2**20:.1f} MiB for a training step, but only {budget / 2**20:.1f} MiB "
            f"are available to the engine; lower the batch size or free memory."
        )
    return int(min(wanted, fit))
