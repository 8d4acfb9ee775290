"""The limits of a study spec: every size and count a spec may ask for, checked before any work.

A spec is a small text file, but its numbers say how much work a study does: epochs, runs,
seeds, grid axes, a model's width. Validation itself builds models and schedules, so an
absurd number (``n_prunes: 1000000000``, a million seeds, a grid of grids) must be refused
*before* anything proportional to it is computed or allocated. The limits below are far
above any real study (docs/experiments.md, "Limits") and each error message states the limit.

:func:`bound_errors` walks the spec once (linear in its text) and checks every number under a
key of :data:`KEY_LIMITS`, wherever the key appears (training, a dataset's or a method's
``training``, a schedule, a grid's values); :func:`count_variants` counts an entry's grid
combinations without making them.
"""

from __future__ import annotations

from typing import Any

from prunelab._validation import MAX_BATCH, MAX_REPEATS, MAX_THREADS

#: Bytes of a spec file.
MAX_SPEC_BYTES = 1 << 20
#: Nesting depth of a spec's YAML (mappings and lists inside each other).
MAX_DEPTH = 40
#: Characters of one number written in a spec (``1:2:3...`` sexagesimal, a 10 000-digit int).
MAX_NUMBER_CHARS = 64
#: Runs of one study (study-a, the largest shipped, has 3 480).
MAX_RUNS = 50_000
#: (dataset, model, training, method) combinations validated one by one (each builds the model).
MAX_COMBINATIONS = 5_000
#: Seeds of a study (a count, or the length of a list), and the largest seed.
MAX_SEEDS = 1_000
MAX_SEED = 2**32 - 1
#: Sparsity levels in one ``sparsities`` list.
MAX_LEVELS = 1_000
#: Parameters of a model built while validating (float32: 1 GiB).
MAX_MODEL_PARAMETERS = 2**28
#: Any integer option of a model (a width, a channel count, a kernel size).
MAX_MODEL_INT = 1 << 20

MAX_EPOCHS = 10_000
MAX_STEPS = 100_000_000
MAX_PRUNES = 10_000
MAX_BATCH_SIZE = 1 << 20
MAX_SAMPLES = 10_000_000

#: ``key: (largest value, what it counts)``, for numbers under that key anywhere in a spec.
KEY_LIMITS: dict[str, tuple[float, str]] = {
    "epochs": (MAX_EPOCHS, "epochs"),
    "finetune_epochs": (MAX_EPOCHS, "epochs"),
    "start_epochs": (MAX_EPOCHS, "epochs"),
    "every_epochs": (MAX_EPOCHS, "epochs"),
    "at_epochs": (MAX_EPOCHS, "epochs"),
    "n_prunes": (MAX_PRUNES, "prune events"),
    "start": (MAX_STEPS, "steps"),
    "every": (MAX_STEPS, "steps"),
    "at": (MAX_STEPS, "steps"),
    "eval_every": (MAX_STEPS, "steps"),
    "test_every": (MAX_STEPS, "steps"),
    "rewind": (MAX_STEPS, "steps"),
    "finetune_steps": (MAX_STEPS, "steps"),
    "report_at_steps": (MAX_STEPS, "steps"),
    "batch_size": (MAX_BATCH_SIZE, "samples"),
    "calibration": (MAX_SAMPLES, "samples"),
    "n_train": (MAX_SAMPLES, "samples"),
    "n_test": (MAX_SAMPLES, "samples"),
    "validation": (MAX_SAMPLES, "samples"),
    "counts": (MAX_MODEL_INT, "units"),
    "min_keep": (MAX_MODEL_INT * MAX_MODEL_INT, "weights"),
    # a method's latency options: the bounds prunelab.inference_latency checks, so that a spec is
    # refused before training instead of its runs failing when they are timed
    "batch_sizes": (MAX_BATCH, "samples"),
    "rounds": (MAX_REPEATS, "timing rounds"),
    "threads": (MAX_THREADS, "torch threads"),
}

DOCS = 'docs/experiments.md, "Limits"'


def limit_message(key: str, value: Any, high: float, what: str) -> str:
    shown = f"{int(high):,}" if float(high).is_integer() else f"{high:g}"
    return (
        f"the {key!r} parameter must be at most {shown} ({what}; a limit of study specs, "
        f"{DOCS}). Got {value!r} instead."
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bound_errors(spec: Any) -> list[tuple[str, str]]:
    """``(path, message)`` for every number above its key's limit, and for every integer
    option of a model above :data:`MAX_MODEL_INT`; one pass over the spec."""
    errors: list[tuple[str, str]] = []
    _walk(spec, "", None, errors)
    models = spec.get("models") if isinstance(spec, dict) else None
    for i, entry in enumerate(models if isinstance(models, list) else []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key not in ("name", "label", "sparsities"):
                    _model_ints(value, f"models[{i}].{key}", str(key), errors)
    return errors


def _walk(node: Any, path: str, key: str | None, errors: list) -> None:
    stack = [(node, path, key)]
    while stack:
        node, path, key = stack.pop()
        if isinstance(node, dict):
            if set(node) == {"grid"}:  # a grid axis: its values stand for the key
                stack.append((node["grid"], f"{path}.grid", key))
                continue
            for k, v in node.items():
                stack.append((v, f"{path}.{k}" if path else str(k), str(k)))
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]", key) for i, v in enumerate(node))
        elif _is_number(node) and key in KEY_LIMITS:
            high, what = KEY_LIMITS[key]
            if node > high:
                errors.append((path, limit_message(key, node, high, what)))


def _model_ints(node: Any, path: str, key: str, errors: list) -> None:
    stack = [(node, path)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}") for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > MAX_MODEL_INT:
            errors.append((path, limit_message(key, node, MAX_MODEL_INT, "an integer option of a model")))


def count_variants(node: Any, cap: int = MAX_RUNS + 1) -> int:
    """How many variants :func:`prunelab.study.spec.expand_grids` would make of ``node``,
    counted without making them; any count above ``cap`` is returned as ``cap``."""
    if isinstance(node, dict) and set(node) == {"grid"}:
        values = node["grid"]
        if not isinstance(values, list) or not values:
            return 1
        total = 0
        for value in values:
            total = min(cap, total + count_variants(value, cap))
        return total
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    total = 1
    for child in children:
        total = min(cap, total * count_variants(child, cap))
    return total


def build_bounded(name: str, **kwargs):
    """``prunelab.models.build_model(name, **kwargs)``, first built on the meta device (no memory)
    to refuse a model of more than :data:`MAX_MODEL_PARAMETERS` parameters before it is allocated."""
    import torch

    from prunelab.models import build_model

    with torch.device("meta"):
        shape_only = build_model(name, **kwargs)
    count = sum(p.numel() for p in shape_only.parameters())
    if count > MAX_MODEL_PARAMETERS:
        raise ValueError(
            f"model {name!r} with these options has {count:,} parameters, more than "
            f"{MAX_MODEL_PARAMETERS:,} (the limit of a model in a study spec, {DOCS})."
        )
    return build_model(name, **kwargs)
