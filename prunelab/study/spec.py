"""Study specs: YAML → validated spec → the list of runs.

A spec names datasets, models, methods, sparsity levels, seeds, a training budget
and the outputs wanted; every combination is one run. A level is a sparsity, or a
``{layer: sparsity}`` mapping of per-layer targets. A model may carry its own
``sparsities`` (replacing the study's), a method too (a list, or one list per model:
``{model label or name: [...]}``), and a method may be limited to some ``models`` /
``datasets`` (by label or name). A dataset or a method may carry its own ``training``
values over the study's (the method's win over the dataset's). Inside a dataset, model,
method or the training section, a value written ``{grid: [a, b, ...]}`` is a grid
axis too. Every run's config is fully resolved (defaults filled in) and its id is
a hash of that config, so the same run has the same id in every study and
re-running a spec finds the runs already done.

The whole spec is validated before any work starts, and every error is reported
at once with its YAML path::

    spec 'study.yaml' has 2 errors:
      methods[1].criterion: unknown criterion 'magnitde' (did you mean 'magnitude'?); ...
      sparsities[2]: the 'sparsity' parameter ... must be a float in [0, 1). Got 1.2 instead.

Overrides (``--set training.epochs=3``, and a spec's own ``quick:`` section for
``--quick``) are dotted paths applied to the YAML before validation; list items are
addressed by index (``methods.0.lr=0.1``).
"""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunelab._validation import PATH, STR, Types, validate_params
from prunelab.runs import limits
from prunelab.runs.tasks import TASKS, Checker, SpecError
from prunelab.store import PlannedRun, digest, dumps
from prunelab.study._yaml import load_yaml

TOP_LEVEL = (
    "name",
    "description",
    "task",
    "datasets",
    "models",
    "methods",
    "sparsities",
    "seeds",
    "training",
    "outputs",
    "quick",
)
REQUIRED = ("name", "datasets", "models", "methods", "sparsities")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Study:
    """A validated spec and its expansion into runs."""

    name: str
    spec: dict  # the spec after overrides (what was validated)
    runs: list[PlannedRun] = field(default_factory=list)
    source: str | None = None  # the file it came from

    @property
    def outputs(self) -> dict:
        return self.spec.get("outputs") or {}


# ----------------------------------------------------------------- loading
@validate_params({"path": [PATH], "overrides": [Types(list, tuple)], "quick": [bool]})
def load_spec(path: str | Path, *, overrides: Iterable[str] = (), quick: bool = False) -> Study:
    """Read, override, validate and expand a YAML spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [f"no spec file at {path}"])
    try:
        with open(path, "rb") as f:
            data = f.read(limits.MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(str(path), [f"cannot read the spec file: {err.strerror or err}"]) from None
    if len(data) > limits.MAX_SPEC_BYTES:
        raise SpecError(
            str(path),
            [f"the spec file is larger than {limits.MAX_SPEC_BYTES:,} bytes (the limit of a spec, {limits.DOCS})"],
        )
    try:
        raw = load_yaml(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise SpecError(str(path), [f"not UTF-8 text: {err.reason} at byte {err.start}"]) from None
    except yaml.YAMLError as err:
        raise SpecError(str(path), [f"not valid YAML: {err}"]) from None
    return build_study(raw, overrides=overrides, quick=quick, source=str(path))


@validate_params({"overrides": [Types(list, tuple)], "quick": [bool], "source": [STR, None]})
def build_study(raw: Any, *, overrides: Iterable[str] = (), quick: bool = False, source: str | None = None) -> Study:
    """Validate and expand a spec given as a dict (as parsed from YAML)."""
    where = source or "<spec>"
    if not isinstance(raw, dict):
        raise SpecError(
            where, [f"a spec must be a mapping of keys (name, datasets, models, ...); got {type(raw).__name__}"]
        )
    spec = copy.deepcopy(raw)
    errors: list[str] = []
    if quick:
        quick_overrides = spec.get("quick")
        if not isinstance(quick_overrides, dict):
            errors.append(
                "quick: --quick needs a 'quick:' section in the spec (a mapping of dotted "
                "paths to values, e.g. {training.epochs: 2, seeds: 1})"
            )
        else:
            for key, value in quick_overrides.items():
                _apply(spec, str(key), value, errors, origin="quick")
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            errors.append(f"--set {item!r}: expected PATH=VALUE, e.g. --set training.epochs=3")
            continue
        try:
            value = load_yaml(text)
        except yaml.YAMLError as err:
            errors.append(
                f"--set {item!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                f"quote it, e.g. --set 'description=\"...\"'"
            )
            continue
        _apply(spec, key.strip(), value, errors, origin="--set")
    errors += [f"{path}: {message}" for path, message in limits.bound_errors(spec)]
    if errors:
        raise SpecError(where, errors)
    checker = Checker()
    runs = _expand(spec, checker)
    if checker.errors:
        raise SpecError(where, checker.errors)
    return Study(name=spec["name"], spec=spec, runs=runs, source=source)


def _apply(spec: dict, dotted: str, value: Any, errors: list[str], origin: str) -> None:
    """Set ``spec[a][b][0][c] = value`` for ``a.b.0.c``; intermediate keys must exist
    (except the last, which may be new), so a typo is reported, not silently added."""
    parts = dotted.split(".")
    node: Any = spec
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                errors.append(f"{origin} {dotted}: {here} is not an index of a {len(node)}-item list")
                return
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                node[part] = {}
            node = node[part]
        else:
            errors.append(f"{origin} {dotted}: {here} is a {type(node).__name__}, not a mapping or list")
            return
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            errors.append(f"{origin} {dotted}: {last!r} is not an index of a {len(node)}-item list")
            return
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        errors.append(f"{origin} {dotted}: cannot set a key inside a {type(node).__name__}")


# --------------------------------------------------------------- expansion
def _is_grid(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"grid"}


def expand_grids(node: Any, path: str, checker: Checker) -> list[tuple[Any, dict[str, Any]]]:
    """All variants of ``node`` with every ``{grid: [...]}`` replaced by one of its values;
    each with the chosen values by dotted path (for labels)."""
    if _is_grid(node):
        values = node["grid"]
        if not isinstance(values, list) or not values:
            checker.error(f"{path}.grid", "a grid needs a non-empty list of values")
            return [(None, {})]
        out = []
        for value in values:
            for variant, chosen in expand_grids(value, path, checker):
                out.append((variant, {path: value, **chosen}))
        return out
    if isinstance(node, dict):
        keys = list(node)
        options = [expand_grids(node[k], f"{path}.{k}" if path else k, checker) for k in keys]
        out = []
        for combo in itertools.product(*options):
            out.append(
                ({k: v for k, (v, _) in zip(keys, combo)}, {p: val for _, chosen in combo for p, val in chosen.items()})
            )
        return out
    if isinstance(node, list):
        options = [expand_grids(v, f"{path}[{i}]", checker) for i, v in enumerate(node)]
        return [
            ([v for v, _ in combo], {p: val for _, chosen in combo for p, val in chosen.items()})
            for combo in itertools.product(*options)
        ]
    return [(node, {})]


def _grid_suffix(chosen: dict[str, Any], prefix: str) -> str:
    if not chosen:
        return ""
    parts = []
    for path, value in chosen.items():
        short = path[len(prefix) + 1 :] if path.startswith(prefix + ".") else path
        short = short.rsplit(".", 1)[-1] if short else path
        parts.append(f"{short}={_short(value)}")
    return "[" + ",".join(parts) + "]"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "-".join(_short(v) for v in value)
    if isinstance(value, dict):
        if "name" in value:  # a schedule/regulariser given as a mapping: its name labels it
            return str(value["name"])
        return ",".join(f"{k}={_short(v)}" for k, v in value.items())
    return str(value)


def run_id(config: Mapping) -> str:
    """Stable id of a run: the first 16 hex digits of sha256 of its canonical JSON."""
    return digest(config)


def _entries(spec: dict, key: str, checker: Checker) -> list[tuple[str, dict]]:
    """Normalise a list of names or mappings into (path, mapping) pairs."""
    if key not in spec:
        return []  # a required key that is missing is reported as such
    value = spec[key]
    if not isinstance(value, list) or not value:
        checker.error(key, f"must be a non-empty list (of names or mappings with a 'name'); got {value!r}")
        return []
    out = []
    for i, entry in enumerate(value):
        path = f"{key}[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict):
            checker.error(path, f"must be a name or a mapping; got {entry!r}")
            continue
        out.append((path, entry))
    return out


def _expand(spec: dict, checker: Checker) -> list[PlannedRun]:
    for key in spec:
        if key not in TOP_LEVEL:
            checker.error(str(key), f"unknown key; valid top-level keys: {', '.join(TOP_LEVEL)}")
    for key in REQUIRED:
        models = spec.get("models")
        own_levels = (
            isinstance(models, list) and models and all(isinstance(m, dict) and "sparsities" in m for m in models)
        )
        if key not in spec and not (key == "sparsities" and own_levels):
            checker.error(
                key,
                "missing (required)" + (" (or give every model its own 'sparsities')" if key == "sparsities" else ""),
            )
    name = spec.get("name")
    if "name" in spec and (not isinstance(name, str) or not NAME_PATTERN.match(name)):
        checker.error("name", f"must be a short identifier (letters, digits, '.', '_', '-'); got {name!r}")
    task_name = spec.get("task", "prune")
    try:
        default_task = TASKS.get(task_name, param="task", where="spec")()
    except (ValueError, TypeError) as err:
        checker.error("task", str(err))
        return []

    if "outputs" in spec:
        from prunelab.results.report import outputs_problems

        for problem in outputs_problems(spec["outputs"]):  # each names its outputs.* path
            checker.error("outputs", problem)
    sparsities = _sparsities(spec, checker)
    seeds = _seeds(spec, checker)
    training = spec.get("training") or {}
    if not isinstance(training, dict):
        checker.error("training", f"must be a mapping; got {training!r}")
        training = {}

    datasets = [
        (p, v, chosen)
        for p, e in _bounded_entries(spec, "datasets", checker)
        for v, chosen in expand_grids(e, p, checker)
    ]
    models = [
        (p, v, chosen)
        for p, e in _bounded_entries(spec, "models", checker)
        for v, chosen in expand_grids(e, p, checker)
    ]
    methods = [
        (p, v, chosen)
        for p, e in _bounded_entries(spec, "methods", checker)
        for v, chosen in expand_grids(e, p, checker)
    ]
    trainings = expand_grids(training, "training", checker) if _bounded("training", training, checker) else []
    combinations = len(datasets) * len(models) * len(trainings) * len(methods)
    if combinations > limits.MAX_RUNS:
        checker.error(
            "datasets × models × training × methods",
            f"{combinations:,} combinations, more than a study may have ({limits.MAX_RUNS:,} runs, "
            f"{limits.DOCS}); split the study",
        )
        return []
    # go on despite earlier errors: every combination is still checked, so all errors surface at once

    runs: list[PlannedRun] = []
    prepared_count = 0
    seen: dict[str, str] = {}
    model_levels = {
        m_path: _sparsities(model, checker, f"{m_path}.sparsities")
        for m_path, model, _ in models
        if "sparsities" in model
    }
    filters = {x_path: _filters(x_path, method, datasets, models, checker) for x_path, method, _ in methods}
    dataset_training = [_dataset_training(d_path, dataset, checker) for d_path, dataset, _ in datasets]
    for (d_index, (d_path, dataset, d_chosen)), (m_path, model, m_chosen), (t_train, t_chosen), (
        x_path,
        method,
        x_chosen,
    ) in itertools.product(enumerate(datasets), models, trainings, methods):
        task = default_task
        if "task" in method:  # a method may run another task than the study's
            task = checker.attempt(f"{x_path}.task", lambda: TASKS.get(method["task"], param="task", where="spec")())  # noqa: B023
            if task is None:
                continue
        d_label = dataset.get("label") or dataset.get("name", "?") + _grid_suffix(d_chosen, d_path)
        m_base = model.get("label") or _model_label(model)
        m_label = m_base + _grid_suffix(m_chosen, m_path)  # a labelled grid: conv[kernel=5], ...
        x_base = method.get("label") or task.default_label(method)
        x_label = x_base + _grid_suffix(
            {k: v for k, v in {**x_chosen, **t_chosen}.items() if method.get("label") or _short(v) != x_base}, x_path
        )
        only_datasets, only_models = filters[x_path]
        if (
            only_datasets is not None and d_label not in only_datasets and dataset.get("name") not in only_datasets
        ) or (
            only_models is not None
            and m_label not in only_models
            and m_base not in only_models
            and model.get("name") not in only_models
        ):
            continue
        levels = _method_levels(x_path, method, m_label, model, checker)
        if levels is None:
            levels = model_levels.get(m_path, sparsities)
        model = {k: v for k, v in model.items() if k != "sparsities"}
        method = {k: v for k, v in method.items() if k not in ("models", "datasets", "sparsities", "task")}
        if "training" in dataset:  # the dataset's own budget, under the method's
            t_train = {**t_train, **dataset_training[d_index]}
            dataset = {k: v for k, v in dataset.items() if k != "training"}
        prepared_count += 1
        if prepared_count > limits.MAX_COMBINATIONS or len(runs) > limits.MAX_RUNS:
            checker.error(
                "methods",
                f"more than {limits.MAX_COMBINATIONS:,} (dataset, model, training, method) "
                f"combinations or {limits.MAX_RUNS:,} runs, the limits of a study "
                f"({limits.DOCS}); split the study",
            )
            return []
        prepared = task.prepare(
            dataset=(d_path, dataset),
            model=(m_path, model),
            method=(x_path, method),
            training=t_train,
            checker=checker,
            sparsities=levels,
        )
        if prepared is None:
            continue
        for sparsity in levels:
            for seed in seeds:
                config = task.resolve(prepared, sparsity=sparsity, seed=seed)
                level = task.level(prepared, sparsity)
                rid = run_id(config)
                where = f"{d_path} × {m_path} × {x_path}"
                if rid in seen and seen[rid] != where:
                    checker.error(x_path, f"resolves to the same runs as {seen[rid]} (identical settings)")
                    break
                seen[rid] = where
                runs.append(PlannedRun(rid, config, d_label, m_label, x_label, level, seed))
    _check_unique_labels(runs, checker)
    _check_output_metrics(spec, runs, checker)
    return [] if checker.errors else runs


def _check_output_metrics(spec: dict, runs: list[PlannedRun], checker: Checker) -> None:
    """A table's ``metric:`` typo, found now rather than after the whole study ran (when every
    task of the study declares the metrics it records)."""
    declared = [TASKS.get(name)().metrics for name in {run.config.get("task", "prune") for run in runs}]
    if runs and "outputs" in spec and all(m is not None for m in declared):
        from prunelab.results.report import output_metric_problems

        for problem in output_metric_problems(spec["outputs"], {k for m in declared if m is not None for k in m}):
            path, _, message = problem.partition(": ")
            checker.error(path, message)


def _bounded(path: str, entry: Any, checker: Checker) -> bool:
    """Whether ``entry``'s grid variants are few enough to be made (counted, not made)."""
    count = limits.count_variants(entry)
    if count > limits.MAX_RUNS:
        checker.error(
            path,
            f"its grids make more than {limits.MAX_RUNS:,} variants, more than a study may have runs ({limits.DOCS})",
        )
        return False
    return True


def _bounded_entries(spec: dict, key: str, checker: Checker) -> list[tuple[str, dict]]:
    return [(path, entry) for path, entry in _entries(spec, key, checker) if _bounded(path, entry, checker)]


def _dataset_training(path: str, dataset: dict, checker: Checker) -> dict:
    """A dataset's ``training:`` overrides, checked once here so that errors name the dataset
    ({} when it has none or they are bad)."""
    if "training" not in dataset:
        return {}
    from prunelab.runs.prepare import prepare_training

    override = dataset["training"]
    if prepare_training(path, {}, override, checker) is None:  # the rest: the defaults, all valid
        return {}
    return dict(override)


def _model_label(model: dict) -> str:
    options = {k: v for k, v in model.items() if k not in ("name", "label", "sparsities")}
    return model.get("name", "?") + (f"[{_short(options)}]" if options else "")


def _check_unique_labels(runs: list[PlannedRun], checker: Checker) -> None:
    cells: dict[tuple, str] = {}
    for run in runs:
        key = (run.dataset, run.model, run.method, run.sparsity, run.seed)
        if key in cells and cells[key] != run.id:
            checker.error(
                "methods",
                f"two different runs share the labels dataset={run.dataset}, "
                f"model={run.model}, method={run.method}, sparsity={run.sparsity:g}, "
                f"seed={run.seed}; give them distinct 'label's",
            )
            return
        cells[key] = run.id


def _sparsities(spec: dict, checker: Checker, path: str = "sparsities") -> list:
    """A list of levels: floats in [0, 1), or ``{layer: sparsity}`` dicts of per-layer targets
    (their layer names are checked against the model later)."""
    if "sparsities" not in spec:
        return []  # missing: reported by the required-keys check where it is required
    value = spec["sparsities"]
    if isinstance(value, list) and len(value) > limits.MAX_LEVELS:
        checker.error(path, f"{len(value):,} levels; at most {limits.MAX_LEVELS:,} ({limits.DOCS})")
        return []
    if not isinstance(value, list) or not value:
        checker.error(
            path, f"must be a non-empty list of floats in [0, 1) (or of {{layer: sparsity}} mappings); got {value!r}"
        )
        return []
    out = []
    for i, s in enumerate(value):
        if isinstance(s, dict):
            values = [
                checker.number(f"{path}[{i}].{k}", v, low=0.0, high=1.0, closed="left", param="sparsity")
                for k, v in s.items()
            ]
            if s and all(v is not None for v in values):
                out.append({str(k): float(v) for k, v in s.items()})
            elif not s:
                checker.error(f"{path}[{i}]", "an empty mapping; give each pruned layer a sparsity")
            continue
        got = checker.number(f"{path}[{i}]", s, low=0.0, high=1.0, closed="left", param="sparsity")
        if got is not None:
            out.append(got)
    if len({dumps(v) for v in out}) != len(out):
        checker.error(path, f"contains duplicates: {value!r}")
    return out


def _method_levels(path: str, method: dict, m_label: str, model: dict, checker: Checker) -> list | None:
    """A method's own ``sparsities``: a list for every model, or ``{model label or name: list}``."""
    value = method.get("sparsities")
    if value is None:
        return None
    if isinstance(value, dict):
        for key in (m_label, model.get("name")):
            if key in value:
                return _sparsities({"sparsities": value[key]}, checker, f"{path}.sparsities.{key}")
        return None
    return _sparsities({"sparsities": value}, checker, f"{path}.sparsities")


def _filters(path: str, method: dict, datasets, models, checker: Checker):
    """A method's optional ``datasets:`` / ``models:`` lists (labels or names), checked."""
    out: list[set | None] = []
    for key, entries in (("datasets", datasets), ("models", models)):
        wanted = method.get(key)
        if wanted is None:
            out.append(None)
            continue
        known = {e.get("label") for _, e, _ in entries} | {e.get("name") for _, e, _ in entries}
        known |= {_model_label(e) for _, e, _ in entries} if key == "models" else set()
        known.discard(None)
        if not isinstance(wanted, list) or not all(isinstance(w, str) for w in wanted):
            checker.error(f"{path}.{key}", f"must be a list of {key[:-1]} labels or names; got {wanted!r}")
            out.append(None)
            continue
        for i, w in enumerate(wanted):
            if w not in known:
                checker.error(
                    f"{path}.{key}[{i}]", f"no {key[:-1]} {w!r} in the spec; choose among: {', '.join(sorted(known))}"
                )
        out.append(set(wanted))
    return out


def _seeds(spec: dict, checker: Checker) -> list[int]:
    value = spec.get("seeds", 1)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            checker.error("seeds", f"a count of seeds must be >= 1; got {value}")
            return []
        if value > limits.MAX_SEEDS:
            checker.error(
                "seeds", f"a count of seeds must be at most {limits.MAX_SEEDS:,} ({limits.DOCS}); got {value}"
            )
            return []
        return list(range(value))
    if isinstance(value, list) and len(value) > limits.MAX_SEEDS:
        checker.error("seeds", f"{len(value):,} seeds; at most {limits.MAX_SEEDS:,} ({limits.DOCS})")
        return []
    if not isinstance(value, list) or not value:
        checker.error("seeds", f"must be a count (int >= 1) or a list of ints >= 0; got {value!r}")
        return []
    out = []
    for i, s in enumerate(value):
        got = checker.number(f"seeds[{i}]", s, low=0, high=limits.MAX_SEED, integer=True, param="seed")
        if got is not None:
            out.append(got)
    if len(set(out)) != len(out):
        checker.error("seeds", f"contains duplicates: {value!r}")
    return out
