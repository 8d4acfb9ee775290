"""Masks that keep pruned weights at exactly zero, outside the model.

prunelab zeroes pruned weights *in place* and keeps the masks here, not on the
module: the model stays a plain ``nn.Module`` (same ``state_dict`` keys, no
``weight_orig``/``weight_mask``, no forward hooks; deepcopy and pickle work), and
a pruned model costs nothing extra at inference. During training, the masks
are enforced through the optimiser:

* before each optimiser step the gradients of pruned entries are zeroed, so no
  optimiser state (momentum, Adam moments) accumulates for them;
* after each step the weights are multiplied by the mask again, so even an
  optimiser that moves zero-gradient entries cannot regrow them. This second
  pass is skipped for the built-in optimisers listed in ``ZERO_PRESERVING``:
  for them an entry whose weight, gradient and state are all zero gets an
  update of exactly zero (SGD with momentum/Nesterov/weight decay, the Adam
  family with decoupled or coupled decay, RMSprop, Adagrad), which saves one
  pass over the weights per step; subclasses and other optimisers get both;
* when masks change, the optimiser state of newly pruned entries is cleared.

Each of these is one fused ``torch._foreach_mul_`` over all masked tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class MaskSet:
    """Bool keep-masks for a set of parameters. The float {0, 1} copies that the fused
    multiplies of training need (one per mask, in the parameter's dtype) are made on the first
    training step and dropped when a mask changes: a one-shot prune holds one byte per weight,
    not a second copy of the model."""

    def __init__(self):
        self._masks: dict[torch.Tensor, torch.Tensor] = {}
        self._params: list[torch.Tensor] = []
        self._float: list[torch.Tensor] | None = None

    def set(self, param: torch.Tensor, keep: torch.Tensor) -> None:
        """Set the keep-mask (bool or {0,1}) of ``param``; all-ones masks are dropped."""
        keep = keep.to(device=param.device)
        if bool(keep.all()):
            self._masks.pop(param, None)
        else:
            self._masks[param] = keep.to(dtype=torch.bool).contiguous()
        self._params = list(self._masks)
        self._float = None

    def get(self, param: torch.Tensor) -> torch.Tensor | None:
        """The bool keep-mask of ``param`` (None: nothing pruned)."""
        return self._masks.get(param)

    def __contains__(self, param: object) -> bool:
        return param in self._masks

    def __len__(self) -> int:
        return len(self._masks)

    @property
    def _values(self) -> list[torch.Tensor]:
        if self._float is None:
            self._float = [self._masks[p].to(p.dtype) for p in self._params]
        return self._float

    @torch.no_grad()
    def apply_to_weights(self, *hook_args) -> None:
        if not self._params:
            return
        if self._float is None:  # not training: no float copies needed
            for param in self._params:
                param.masked_fill_(~self._masks[param], 0)
        else:
            torch._foreach_mul_(self._params, self._float)

    def apply_to_grads(self, *hook_args) -> None:
        """Zero the gradients of pruned entries. Runs every step, so it is kept lean: no
        grad-mode switch (gradients are leaves that do not require grad) and one fused call.
        Accepts and ignores torch's optimiser-hook arguments so it can be registered directly."""
        if not self._params:
            return
        grads = [p.grad for p in self._params]
        try:
            # a None gradient raises the TypeError handled below
            torch._foreach_mul_(grads, self._values)  # type: ignore[arg-type]
        except TypeError:  # some parameter has no gradient this step
            pairs = [(g, m) for g, m in zip(grads, self._values) if g is not None]
            if pairs:
                torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def clear_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zero every per-entry state tensor (shaped like its parameter) of pruned entries."""
        for optimizer in optimizers:
            for param, mask in self._masks.items():
                state = optimizer.state.get(param)
                if not state:
                    continue
                for value in state.values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.mul_(mask.to(value.dtype))


# Exact types (not subclasses) whose update is zero for an entry with zero weight,
# zero gradient and zero state; see the module docstring.
ZERO_PRESERVING = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


class OptimizerHooks:
    """Registers grad/weight masking on an optimiser's step hooks.

    ``before_step`` and ``after_step`` are called as ``hook(optimizer, args, kwargs)``
    (torch's hook signature, registered directly to keep the per-step cost low).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, before_step, after_step):
        self.optimizer = optimizer
        self._handles = [optimizer.register_step_pre_hook(before_step)]
        if type(optimizer) not in ZERO_PRESERVING:
            self._handles.append(optimizer.register_step_post_hook(after_step))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
