"""Running a model to let forward hooks observe it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that have no children, in ``model.modules()`` order."""
    return [m for m in model.modules() if not any(True for _ in m.children())]


def forward_eval(model: nn.Module, inputs: Iterable[torch.Tensor], handles: Iterable = ()):
    """Run ``model`` on each of ``inputs`` in eval mode without autograd, then remove the hook
    ``handles`` and restore the model's train/eval flag (also when a forward pass fails).
    Returns the last output (None for no inputs); earlier outputs are not kept."""
    was_training = model.training
    model.eval()
    out = None
    try:
        with torch.no_grad():
            for x in inputs:
                out = model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return out
