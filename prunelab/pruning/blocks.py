"""Cached block inputs: re-run one block of a model on the inputs it last received.

A *block* is a child of an ``nn.Sequential`` or ``nn.ModuleList`` (containers are looked
through: the children of a nested Sequential are blocks), outermost first — ResNet stages'
blocks, Hugging Face ``model.layers`` / ``transformer.h`` / ``encoder.layer``,
``nn.TransformerEncoder.layers``, or the layers of a plain Sequential. A :class:`Trace` of one
calibration pass finds the blocks called exactly once per batch and the *links* between
consecutive ones: block b's inputs are block a's output (the tensor, or the first element of
a tuple) in one argument, and exactly the same objects as a's inputs in every other positional
and keyword argument (attention masks, position embeddings, ``position_ids``, …). Along a link
the inputs of b are made by running a alone on its cached inputs, never the whole model.

The user may name the stack instead (``"model.layers"``, see :func:`resolve_stack`): then its
children are the blocks. The cached inputs of one block live in an :class:`InputCache`, in
memory or spilled to a temporary directory on disk, one batch at a time.

Used by the sequential mode of the layer-wise OBS solvers and by Wanda block by block; any method
that needs each block's inputs after the blocks before it changed can use it the same way. The
options those criteria share live here too: their check (:func:`check_block_options`,
:func:`check_compute_dtype`), the progress bar over the blocks (:class:`BlockBar`) and the
peak-memory column of their reports (:func:`mib`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunelab._validation import check_choice
from prunelab.inputs import as_batch

CONTAINERS = (nn.Sequential, nn.ModuleList)
_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device)


class _Stop(Exception):
    """Ends a forward early, once the inputs it was run for are captured."""


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost non-container children of every Sequential/ModuleList."""
    found = []

    def walk(module):
        for child in module.children():
            if isinstance(module, CONTAINERS) and not isinstance(child, CONTAINERS):
                found.append(child)
            else:
                walk(child)

    walk(model)
    return found


def stacks(model: nn.Module) -> list[str]:
    """Dotted names of the model's ModuleLists and Sequentials with children: the stacks of
    blocks a user may name."""
    return [name for name, m in model.named_modules() if name and isinstance(m, CONTAINERS) and len(m) > 0]


def resolve_stack(model: nn.Module, stack, *, where: str) -> nn.Module:
    """The ``nn.ModuleList``/``nn.Sequential`` that ``stack`` names in ``model`` (a dotted path
    such as ``"model.layers"``, or the module itself); a ValueError/TypeError naming the bad path
    and the stacks found otherwise."""
    found = stacks(model)
    hint = f"stacks of blocks found: {', '.join(found[:12])}" if found else "the model has no ModuleList or Sequential"
    if isinstance(stack, nn.Module):
        if not any(m is stack for m in model.modules()):
            raise ValueError(
                f"the 'blocks' parameter of {where} is a {type(stack).__name__} that is not part of the model; {hint}."
            )
        module, name = stack, type(stack).__name__
    elif isinstance(stack, str):
        try:
            module = model.get_submodule(stack) if stack else model
        except AttributeError:
            raise ValueError(
                f"the 'blocks' parameter of {where} names {stack!r}, which is not a submodule of "
                f"the {type(model).__name__}; {hint}."
            ) from None
        name = repr(stack)
    else:
        raise TypeError(
            f"the 'blocks' parameter of {where} must be a dotted module path such as "
            f"'model.layers' or an nn.ModuleList. Got {stack!r} of type {type(stack).__name__} instead."
        )
    if not isinstance(module, CONTAINERS) or len(module) == 0:
        what = "an empty container" if isinstance(module, CONTAINERS) else f"a {type(module).__name__}"
        raise ValueError(
            f"the 'blocks' parameter of {where} names {name}, {what}, not an nn.ModuleList or "
            f"nn.Sequential of blocks; {hint}."
        )
    return module


def same(a, b) -> bool:
    """``a`` and ``b`` are the same input: the same tensor (unchanged), equal plain values, or
    containers of those."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return a is b
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and type(a) is type(b):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return isinstance(a, _SIMPLE) and type(a) is type(b) and a == b


def _main_output(output):
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    return None


def _slots(args, kwargs):
    return [("arg", i) for i in range(len(args))] + [("kw", k) for k in kwargs]


def _get(call, slot):
    return call[0][slot[1]] if slot[0] == "arg" else call[1][slot[1]]


def link_slot(before: tuple, output, after: tuple):
    """The argument of ``after`` that is ``before``'s output, when every other argument is the
    same as ``before``'s; else None."""
    main = _main_output(output)
    if main is None or len(before[0]) != len(after[0]) or before[1].keys() != after[1].keys():
        return None
    found = None
    for slot in _slots(*after):
        if _get(after, slot) is main:
            if found is not None:
                return None
            found = slot
        elif not same(_get(before, slot), _get(after, slot)):
            return None
    return found


class Trace:
    """One calibration pass that records which blocks are called once per batch, in which
    order, and which consecutive ones are linked (see the module docstring)."""

    def __init__(self, model: nn.Module, batches: list, watch=(), after_batch=None, stack=None):
        self.model, self.batches, self.after_batch = model, batches, after_batch
        self.blocks = find_blocks(model if stack is None else stack)
        self.order: list[nn.Module] = []  # blocks in call order (first batch)
        self.links: dict[int, tuple] = {}  # id(block) -> slot fed by the previous block
        self.calls: dict[int, int] = {}  # calls of watched modules in the last batch
        self.once: set[int] = set()  # watched modules called once in every batch
        self._run(list(watch))

    def _run(self, watch):
        counts = {id(m): [] for m in self.blocks + watch}
        links: dict[int, list] = {}
        order_sets = []
        last = {}

        def pre(module, args, kwargs):
            prev = last.get("call")
            if prev is not None:
                a, before, output, version = prev
                slot = link_slot(before, output, (args, kwargs))
                main = _main_output(output)
                ok = slot is not None and main._version == version
                links.setdefault(id(module), []).append((id(a), slot if ok else None))
            else:
                links.setdefault(id(module), []).append((None, None))
            last["pending"] = (module, args, kwargs)
            seen.append(module)

        def post(module, args, kwargs, output):
            main = _main_output(output)
            last["call"] = (module, (args, kwargs), output, None if main is None else main._version)

        def count(module, args, kwargs, output=None):
            calls[id(module)] = calls.get(id(module), 0) + 1

        handles = []
        for block in self.blocks:
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
        for module in {id(m): m for m in self.blocks + watch}.values():
            handles.append(module.register_forward_pre_hook(lambda m, a, k: count(m, a, k), with_kwargs=True))
        try:
            with torch.no_grad():
                for i, batch in enumerate(self.batches):
                    calls, seen = {}, []
                    last.clear()
                    as_batch(batch, where="L-OBS", index=i).call(self.model)
                    if self.after_batch is not None:
                        self.after_batch()
                    for key in counts:
                        counts[key].append(calls.get(key, 0))
                    order_sets.append([id(m) for m in seen])
        finally:
            for h in handles:
                h.remove()
        self.once = {key for key, c in counts.items() if c and all(n == 1 for n in c)}
        by_id = {id(b): b for b in self.blocks}
        first = order_sets[0] if order_sets else []
        self.order = [by_id[k] for k in first if k in self.once and k in by_id]
        consistent = all(o == first for o in order_sets)
        for i, block in enumerate(self.order[1:], 1):
            record = links.get(id(block), [])
            slots = {r[1] for r in record}
            prev_ok = all(r[0] == id(self.order[i - 1]) for r in record)
            if consistent and prev_ok and len(slots) == 1 and None not in slots:
                self.links[id(block)] = slots.pop()

    def previous(self, block) -> nn.Module | None:
        """The block whose output feeds ``block`` along a link, or None."""
        if id(block) not in self.links:
            return None
        return self.order[self.order.index(block) - 1]

    def block_of(self, module: nn.Module) -> nn.Module | None:
        """The traced block (called once per batch) that contains ``module``, if any."""
        for block in self.order:
            if any(m is module for m in block.modules()):
                return block
        return None


class InputCache:
    """One block's ``(args, kwargs)`` per batch, in memory, or with ``directory`` on disk (one
    file per batch, loaded one at a time: calibration activations larger than memory fit).
    Iterating yields the entries in batch order; ``cache[i] = entry`` replaces one. With ``cast``
    (a dtype) appended entries have their floating tensors cast to it."""

    def __init__(self, directory: str | Path | None = None, cast: torch.dtype | None = None):
        self.directory = None if directory is None else Path(directory)
        self.cast = cast
        self._entries: list = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def append(self, entry: tuple) -> None:
        if self.cast is not None:
            entry = _cast(entry, self.cast)
        self._count += 1
        self[self._count - 1] = entry

    def __setitem__(self, i: int, entry: tuple) -> None:
        if self.directory is None:
            if i == len(self._entries):
                self._entries.append(entry)
            else:
                self._entries[i] = entry
        else:
            torch.save(_compact(entry), self.directory / f"{i}.pt")

    def __getitem__(self, i: int) -> tuple:
        if self.directory is None:
            return self._entries[i]
        # our own file, written by this process a moment ago into its private temporary directory
        return torch.load(self.directory / f"{i}.pt", weights_only=False)

    def __iter__(self):
        for i in range(self._count):
            yield self[i]

    def nbytes(self) -> int:
        """Bytes of the tensors held in memory (0 when spilled to disk)."""
        seen, total = set(), 0
        for entry in self._entries:
            for t in _tensors(entry):
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total


class Spill:
    """A private temporary directory for spilled block inputs, removed on :meth:`close` (and on
    leaving a ``with`` block, also after an error). ``new()`` gives an empty cache in it."""

    def __init__(self, parent: str | Path | None = None):
        self.path = Path(tempfile.mkdtemp(prefix="prunelab-blocks-", dir=parent))
        self._n = 0

    def new(self, cast: torch.dtype | None = None) -> InputCache:
        for old in self.path.iterdir():  # one block's inputs on disk at a time
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        self._n += 1
        directory = self.path / str(self._n)
        directory.mkdir()
        return InputCache(directory, cast=cast)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cast(value, dtype):
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _map_tensors(fn, value):
    """``value`` with ``fn`` applied to every tensor in it (through tuples, lists and dicts)."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(fn, v) for v in value)
    if isinstance(value, list):
        return [_map_tensors(fn, v) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    return value


def _compact(value):
    """``value`` with every tensor that views a larger storage copied (``torch.save`` would write
    the whole storage)."""

    def own(t):
        return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t

    return _map_tensors(own, value)


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def capture_inputs(model: nn.Module, batches: list, block: nn.Module, into: InputCache | None = None):
    """``block``'s ``(args, kwargs)`` on every batch, from forwards of ``model`` cut short
    once the block is reached; appended to ``into`` when given (and returned), else a list."""
    captured: list[tuple] | InputCache = [] if into is None else into

    def pre(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                try:
                    as_batch(batch, where="L-OBS", index=i).call(model)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def _fresh(value):
    """A copy of the tensors among a block's inputs (a block may change its inputs in place)."""
    return _map_tensors(torch.Tensor.clone, value)


def run_block(block: nn.Module, inputs, after=None, keep: bool = True, stop_after=()) -> list:
    """Run ``block`` on each cached ``(args, kwargs)``; ``after()`` is called after each one.
    Returns the outputs (an empty list with ``keep=False``: one batch's output alive at a time).
    With ``stop_after`` (modules called once per forward), each run ends as soon as all of them
    have returned — its output is then None: what a Hessian needs is captured, and the rest of
    the block is not computed."""
    wanted = {id(m): m for m in stop_after}
    fired = set()

    def stop(module, args, output):
        fired.add(id(module))
        if len(fired) == len(wanted):
            raise _Stop

    handles = [m.register_forward_hook(stop) for m in wanted.values()]
    outputs = []
    try:
        with torch.no_grad():
            for args, kwargs in inputs:
                fired.clear()
                try:
                    output = block(*_fresh(args), **_fresh(kwargs))
                except _Stop:
                    output = None
                if keep:
                    outputs.append(output)
                del output
                if after is not None:
                    after()
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def advance(block: nn.Module, cache, slot) -> None:
    """Turn ``cache`` (``block``'s inputs) into the inputs of the block linked after it, in place,
    one batch at a time: only one block's activations (and one batch's output) are held."""
    with torch.no_grad():
        for i in range(len(cache)):
            args, kwargs = cache[i]
            output = block(*_fresh(args), **_fresh(kwargs))
            cache[i] = next_inputs([(args, kwargs)], [output], slot)[0]
            del args, kwargs, output


def next_inputs(inputs: list[tuple], outputs: list, slot) -> list[tuple]:
    """The inputs of the block linked after the one that took ``inputs`` and gave ``outputs``."""
    made = []
    for (args, kwargs), output in zip(inputs, outputs):
        main = _main_output(output)
        args, kwargs = list(args), dict(kwargs)
        if slot[0] == "arg":
            args[slot[1]] = main
        else:
            kwargs[slot[1]] = main
        made.append((tuple(args), kwargs))
    return made


# ----------------------------------------------------------------------------- block-by-block options
OFFLOADS = ("memory", "disk")


def mib(n: int | None) -> str:
    """Bytes as whole MiB for a report's peak-memory column; ``-`` when not known."""
    return "-" if n is None else f"{n / 2**20:.0f}"


class BlockBar:
    """A tqdm bar over the blocks being pruned (a layer outside any block counts as one)."""

    def __init__(self, todo, block_name: dict, shown: bool, solver: str):
        self.unit = {t.name: block_name.get(t.name) or t.name for t in todo}
        self.last = {}
        for t in todo:
            self.last[self.unit[t.name]] = t.name
        self.bar = tqdm(total=len(self.last), disable=not shown, desc=solver, unit="block", leave=False)

    def step(self, target) -> None:
        unit = self.unit.get(target.name)
        if unit is not None and self.last.get(unit) == target.name:
            self.bar.set_postfix_str(unit, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def check_block_options(blocks, offload, progress, mode: str, where: str):
    """The block-by-block options, checked before any work (the stack's path against the model
    later, in ``validate``)."""
    if blocks is not None and not isinstance(blocks, (str, torch.nn.Module)):
        raise TypeError(
            f"the 'blocks' parameter of {where} must be a dotted module path such as "
            f"'model.layers' or an nn.ModuleList. Got {blocks!r} of type {type(blocks).__name__} instead."
        )
    if offload is not None:
        offload = check_choice("offload", offload, OFFLOADS, where=where)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"the 'progress' parameter of {where} must be a bool or None. Got {progress!r} instead.")
    if mode != "sequential" and (blocks is not None or offload == "disk"):
        raise ValueError(
            f"the 'blocks' and 'offload' parameters of {where} apply to mode 'sequential' "
            f"(block by block); got mode {mode!r}."
        )
    return blocks, (None if offload == "memory" else offload), progress


COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_compute_dtype(value, mode: str, where: str):
    """None (each block runs in its own dtype) or float32/float64 (a name or the torch dtype)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    dtype = COMPUTE_DTYPES[check_choice("compute_dtype", value, COMPUTE_DTYPES, where=where)]
    if mode != "sequential":
        raise ValueError(
            f"the 'compute_dtype' parameter of {where} applies to mode 'sequential' (block by "
            f"block); got mode {mode!r}."
        )
    return dtype
