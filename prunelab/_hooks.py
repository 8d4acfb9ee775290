"""Running a model to let forward hooks observe it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that have no children, in ``model.modules()`` order."""
    return [m for m in model.modules() if not any(True for _ in m.children())]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; afterwards (also when the block fails) every module's
    own ``training`` flag is restored, so a model with mixed flags (a frozen BatchNorm in a training
    model) comes back exactly as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def forward_eval(model: nn.Module, inputs: Iterable[torch.Tensor], handles: Iterable = ()):
    """Run ``model`` on each of ``inputs`` in eval mode without autograd, then remove the hook
    ``handles`` and restore every module's train/eval flag (also when a forward pass fails).
    Returns the last output (None for no inputs); earlier outputs are not kept."""
    out = None
    try:
        with eval_mode(model), torch.no_grad():
            for x in inputs:
                out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out
