"""The Hessians of sequential mode, at a cost linear in depth.

Sequential L-OBS prunes the layers in order, each from the inputs that the already pruned
layers before it give. Re-running the whole model for every layer costs depth² block
forwards. Here one trace pass (:class:`prunelab.pruning.blocks.Trace`) finds the model's
blocks and their links, and which layers read the very same input tensor on every batch
(q/k/v, gate/up, a residual block's first conv and its shortcut): such a group's Hessians
come from one pass, since pruning one — or any layer called after that tensor existed —
cannot change the others' input. A layer inside a
block is served by running that block alone on its cached inputs; when the layers of block
i are done, running block i once on its cache gives block i+1's inputs. The whole model
runs only for layers outside any block (a stem, a head), for a block with no link to the
block before it (its inputs are captured by a forward cut short at the block), and once for
the trace. The Hessians are bit-for-bit those of one full forward per layer.

Memory is bounded by one block: the cache holds one block's inputs (advanced in place to the
next block's, batch by batch), the Hessians held are those of one group of layers, and the
trace keeps no activations past the batch it runs. With ``stack`` the user names the stack of
blocks (its children are the blocks); with ``spill`` (a :class:`blocks.Spill`) the cached
inputs live on disk, one batch in memory at a time. With ``compute`` (a dtype, e.g. float32 for
a bfloat16 model on a CPU without bfloat16 arithmetic) the block being served runs in that dtype
on inputs cast to it, and returns to its own dtype once the cache moves past it (its pruned
weights are rounded to the model's dtype then); whole-model forwards run in the model's dtype.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from prunelab.inputs import as_batch
from prunelab.pruning import blocks as blk
from prunelab.pruning.lobs.hessian import (
    Accumulator,
    LayerHessian,
    attention_parents,
    calibration_mode,
    hook_site,
    input_key,
    same_input,
)
from prunelab.pruning.targets import Target


class SequentialHessians:
    """Serves ``get(target)`` for the targets in order; ``pruned(target)`` after each prune."""

    def __init__(
        self,
        model: nn.Module,
        targets: list[Target],
        batches: list,
        *,
        with_bias: bool,
        stack: nn.Module | None = None,
        spill: blk.Spill | None = None,
        compute: torch.dtype | None = None,
    ):
        self.model, self.targets, self.batches, self.with_bias = model, targets, batches, with_bias
        self.stack, self.spill, self.compute = stack, spill, compute
        self._raised: dict[int, tuple] = {}  # id(block) -> (block, [(tensor, its own dtype)])
        self.parents = attention_parents(model)
        self.sites = {t.name: hook_site(t, self.parents) for t in targets}
        self.forwards = {"trace": 0, "model": 0, "cut short": 0, "block": 0}
        self._cache: tuple | None = None  # (block, InputCache of its (args, kwargs) per batch)
        self._ready: dict[str, LayerHessian] = {}
        with calibration_mode(model):
            self._trace()
        names = {id(m): name for name, m in model.named_modules()}
        self.block_name = {
            t.name: (names[id(b)] if b is not None else None) for t, b in ((t, self.block[t.name]) for t in targets)
        }
        if stack is not None:
            self._check_stack(names)

    def _check_stack(self, names: dict) -> None:
        """Warn when a named stack cannot be served block by block (its layers then get their
        inputs from whole-model forwards: right, but slower)."""
        blocks = self.trace.blocks
        not_once = [names[id(b)] for b in blocks if id(b) not in self.trace.once]
        unlinked = [names[id(b)] for b in self.trace.order[1:] if id(b) not in self.trace.links]
        if not_once or unlinked:
            warnings.warn(
                "the named stack of blocks cannot be run block by block everywhere: "
                + (f"not called exactly once per batch: {', '.join(not_once)}. " if not_once else "")
                + (
                    f"inputs not the previous block's output with the same other arguments: {', '.join(unlinked)}. "
                    if unlinked
                    else ""
                )
                + "Those blocks' inputs come from forwards of the whole model cut short.",
                stacklevel=4,
            )

    def _trace(self) -> None:
        keys = {t.name: None for t in self.targets}  # this batch's input keys
        firsts: dict[str, str | None] = {}  # the first target that read the same tensor
        called: dict[str, int] = {}
        signatures: dict[str, list[str | None]] = {t.name: [] for t in self.targets}

        def hook_for(target):
            def hook(module, args, kwargs, output):
                called.setdefault(target.name, len(called))  # call order, first batch
                key = input_key(target, module, args, kwargs)
                # compared now, while the tensor is alive (a freed tensor's weak reference is dead)
                firsts[target.name] = next(
                    (name for name, other in keys.items() if other is not None and same_input(other, key)), target.name
                )
                keys[target.name] = key if target.name not in firsts or keys[target.name] is None else ("many",)

            return hook

        def after_batch():
            for t in self.targets:
                signatures[t.name].append(firsts.get(t.name) if keys[t.name] != ("many",) else None)
            for name in keys:
                keys[name] = None
            firsts.clear()

        handles = [self.sites[t.name].register_forward_hook(hook_for(t), with_kwargs=True) for t in self.targets]
        try:
            self.trace = blk.Trace(
                self.model, self.batches, watch=list(self.sites.values()), after_batch=after_batch, stack=self.stack
            )
        finally:
            for h in handles:
                h.remove()
        self.forwards["trace"] += len(self.batches)
        self.block = {}
        for t in self.targets:
            site = self.sites[t.name]
            self.block[t.name] = self.trace.block_of(site) if id(site) in self.trace.once else None
        # a group: targets of one block that read the same tensor on every batch. Pruning a layer
        # called after that tensor existed cannot change it, so the layers in between in the
        # pruning order must all be called after the group's first reader.
        self.group = {}
        for i, t in enumerate(self.targets):
            sig = signatures[t.name]
            members = [t]
            if id(self.sites[t.name]) in self.trace.once and sig and None not in sig:
                for j in range(i + 1, len(self.targets)):
                    other = self.targets[j]
                    if (
                        signatures[other.name] == sig
                        and self.block[other.name] is self.block[t.name]
                        and id(self.sites[other.name]) in self.trace.once
                    ):
                        start = min(called[t.name], called[other.name])
                        if all(called.get(b.name, -1) > start for b in self.targets[i + 1 : j] if b not in members):
                            members.append(other)
            self.group[t.name] = members

    def get(self, target: Target) -> LayerHessian:
        if target.name in self._ready:
            return self._ready.pop(target.name)
        members = self.group[target.name]
        block = self.block[target.name]
        accumulator = Accumulator(members, self.parents, with_bias=self.with_bias)
        with calibration_mode(self.model):
            if block is None:
                self._cache = None  # pruning this layer would make it stale anyway: free it now
                self.restore()
                with accumulator:
                    for i, batch in enumerate(self.batches):
                        as_batch(batch, where="L-OBS", index=i).call(self.model)
                        accumulator.end_batch()
                self.forwards["model"] += len(self.batches)
            else:
                inputs = self._inputs_of(block)
                self._raise(block)
                sites = [self.sites[m.name] for m in members]
                early = sites if all(id(site) in self.trace.once for site in sites) else ()
                with accumulator:  # hooks fire in order: the stop comes after the accumulation
                    blk.run_block(block, inputs, after=accumulator.end_batch, keep=False, stop_after=early)
                self.forwards["block"] += len(self.batches)
        stats = accumulator.result()
        for other in accumulator.shared_input(target.name):
            if other != target.name:
                self._ready[other] = stats[other]
        return stats[target.name]

    def pruned(self, target: Target) -> None:
        """A pruned layer changes every cached input but that of its own block."""
        if self._cache is not None and self._cache[0] is not self.block[target.name]:
            self._cache = None

    def ready_bytes(self) -> int:
        """Bytes of the Hessians computed with an earlier layer's and not yet served."""
        return sum(h.xtx.numel() * h.xtx.element_size() for h in self._ready.values())

    def cached_bytes(self) -> int:
        """Bytes of cached block inputs held in memory now (0 when spilled to disk)."""
        return 0 if self._cache is None else self._cache[1].nbytes()

    def block_inputs(self, block: nn.Module) -> blk.InputCache:
        """``block``'s cached inputs (made from the block before it, as it is now, or by a forward
        cut short), with ``block`` in the compute dtype until the cache moves past it: for a
        method that collects its own statistics block by block (Wanda's input norms; run the
        block in :func:`calibration_mode`)."""
        with calibration_mode(self.model):  # no key/value cache may be captured or filled
            inputs = self._inputs_of(block)
        self._raise(block)
        return inputs

    def forget(self) -> None:
        """Drop the cached inputs and put every block back in its dtype (before a forward of the
        whole model, which a later prune would make stale anyway)."""
        self._cache = None
        self.restore()

    def _inputs_of(self, block: nn.Module) -> blk.InputCache:
        path = [block]
        b: nn.Module | None = block
        while self._cache is None or self._cache[0] is not b:
            b = self.trace.previous(b)
            if b is None:
                break
            path.append(b)
        if b is not None and self._cache is not None and self._cache[0] is b and b is not block:
            cache, self._cache = self._cache[1], None  # advanced in place: invalid if that fails
            path.reverse()  # from the cached block forwards
            for before, after in zip(path, path[1:]):
                self._raise(before)
                blk.advance(before, cache, self.trace.links[id(after)])
                self._lower(before)
                self.forwards["block"] += len(self.batches)
        elif self._cache is not None and self._cache[0] is block:
            cache = self._cache[1]
        else:
            self._cache = None  # the old cache goes before the new one is made
            self.restore()
            cache = blk.InputCache(cast=self.compute) if self.spill is None else self.spill.new(cast=self.compute)
            blk.capture_inputs(self.model, self.batches, block, into=cache)
            self.forwards["cut short"] += len(self.batches)
        self._cache = (block, cache)
        return cache

    def _raise(self, block: nn.Module) -> None:
        """``block``'s floating parameters and buffers in the compute dtype (kept in place)."""
        if self.compute is None or id(block) in self._raised:
            return
        own = [
            (t, t.dtype)
            for t in list(block.parameters()) + list(block.buffers())
            if t.is_floating_point() and t.dtype != self.compute
        ]
        for t, _ in own:
            t.data = t.data.to(self.compute)
        self._raised[id(block)] = (block, own)

    def _lower(self, block: nn.Module) -> None:
        _, own = self._raised.pop(id(block), (None, []))
        for t, dtype in own:
            t.data = t.data.to(dtype)

    def restore(self) -> None:
        """Every block back in its own dtype (also called when the prune ends)."""
        for _, block_and_own in list(self._raised.items()):
            self._lower(block_and_own[0])
