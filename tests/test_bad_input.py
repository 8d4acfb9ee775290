"""Every user mistake raises ValueError/TypeError naming the parameter, value and choices —
before any training starts."""

import inspect

import pytest
import torch
from torch import nn

from prunelab.pruning import Pruner, make_schedule, prune
from prunelab.training import fit


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


XY = (torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,)))

PRUNER_CASES = [
    ({"sparsity": 1.0}, ValueError, r"'sparsity' parameter of Pruner must be a float in \[0, 1\)\. Got 1\.0"),
    ({"sparsity": -0.1}, ValueError, r"Got -0\.1 instead"),
    ({"sparsity": float("nan")}, ValueError, r"'sparsity'.*Got nan"),
    ({"sparsity": "0.5"}, TypeError, r"'sparsity'.*Got '0\.5' of type str"),
    ({"sparsity": True}, TypeError, r"'sparsity'"),
    (
        {"sparsity": 0.5, "criterion": "magnitde"},
        ValueError,
        r"unknown criterion 'magnitde' \(did you mean 'magnitude'\?\).*gradient, lobs, magnitude, obd, obs-exact, obs-fast, random",
    ),
    (
        {"sparsity": 0.5, "granularity": "filters"},
        ValueError,
        r"unknown granularity 'filters'.*channel, filter, kernel",
    ),
    ({"sparsity": 0.5, "scope": "globl"}, ValueError, r"unknown scope 'globl'.*global, layerwise-constant, local"),
    ({"sparsity": 0.5, "schedule": "cubic"}, ValueError, r"unknown schedule 'cubic'.*agp, fixed-fraction"),
    (
        {"sparsity": 0.5, "layers": ["fc9"]},
        ValueError,
        r"'layers' parameter of Pruner names 'fc9'.*Valid module names: 0, 3",
    ),
    (
        {"sparsity": 0.5, "granularity": "kernel", "layers": ["3"]},
        ValueError,
        r"granularity 'kernel' applies only to Conv layers; '3.weight' is the 'weight' of a Linear",
    ),
    (
        {"sparsity": 0.5, "reduction": "max"},
        ValueError,
        r"'reduction' parameter of Pruner must be one of: l2, mean, sum\. Got 'max'",
    ),
    ({"sparsity": 0.5, "min_keep": 0}, ValueError, r"'min_keep' parameter of Pruner must be an int in \[1, inf\]"),
    ({"sparsity": 0.5, "rewind": "start"}, ValueError, r"'rewind' parameter of Pruner must be None, 'init'"),
    (
        {"sparsity": 0.5, "schedule": "agp", "schedule_args": {"n_prunes": 0}},
        ValueError,
        r"'n_prunes' parameter of agp schedule must be an int in \[1, 100000\]\. Got 0",
    ),
    (
        {"sparsity": 0.5, "schedule": "agp", "schedule_args": {"every": 1.5}},
        TypeError,
        r"'every' parameter of agp schedule",
    ),
    (
        {"sparsity": 0.5, "schedule": "iterative", "schedule_args": {"exponent": 0.5}},
        ValueError,
        r"'exponent' parameter of iterative schedule must be a float in \[1, 1000\]",
    ),
    (
        {"sparsity": 0.5, "schedule": "agp", "schedule_args": {"n_prune": 3}},
        TypeError,
        r"schedule 'agp' got unknown option\(s\) 'n_prune'; valid options: every, initial_sparsity, n_prunes",
    ),
    ({"schedule": "agp"}, ValueError, r"schedule 'agp' needs option\(s\) 'sparsity'; valid options: every, "),
    ({"schedule": "fixed-fraction"}, ValueError, r"schedule 'fixed-fraction' needs option\(s\) 'fraction'"),
]


@pytest.mark.parametrize("kwargs,error,pattern", PRUNER_CASES, ids=[str(c[0]) for c in PRUNER_CASES])
def test_pruner_rejects_bad_input_before_touching_weights(kwargs, error, pattern):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=pattern):
        Pruner(m, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_prune_rejects_non_module_and_bad_sparsity():
    with pytest.raises(TypeError, match="'model' parameter of prune must be a torch.nn.Module"):
        prune("net", 0.5)
    with pytest.raises(ValueError, match=r"'sparsity' parameter of prune must be a float in \[0, 1\)"):
        prune(model(), 1.5)


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"'initial_sparsity' parameter of agp schedule must be <= sparsity"):
        make_schedule("agp", 0.5, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="would remove every weight"):
        make_schedule("fixed-fraction", fraction=0.5, n_prunes=2, of="layer")
    with pytest.raises(ValueError, match=r"'of' parameter of fixed-fraction schedule must be one of: layer, remaining"):
        make_schedule("fixed-fraction", fraction=0.1, n_prunes=2, of="all")
    with pytest.raises(ValueError, match="needs 'n_prunes', 'sparsity' or both"):
        make_schedule("fixed-fraction", fraction=0.1)
    with pytest.raises(ValueError, match="a callable schedule gives its own sparsity"):
        Pruner(model(), 0.5, schedule=lambda step: 0.5)


FIT_CASES = [
    ({"epochs": -1}, ValueError, r"'epochs' parameter of fit must be an int in \[0, 100000\]\. Got -1"),
    ({"lr": 0.0}, ValueError, r"'lr' parameter of fit must be a float in \(0, inf\)"),
    ({"batch_size": 0}, ValueError, r"'batch_size' parameter of fit"),
    (
        {"optimizer": "sgdd"},
        ValueError,
        r"'optimizer' parameter of fit must be one of: adam, adamw, sgd\. Got 'sgdd' instead \(did you mean 'sgd'\?\)",
    ),
    ({"momentum": 1.0}, ValueError, r"'momentum' parameter of fit must be a float in \[0, 1\)"),
    ({"regularizer": "l3", "reg_strength": 0.1}, ValueError, r"unknown regularizer 'l3'.*group-lasso, l1, l2"),
    ({"regularizer": "l1", "reg_strength": -1.0}, ValueError, r"'strength' parameter of l1 regularizer"),
    ({"seed": -3}, ValueError, r"'seed' parameter of fit"),
]


@pytest.mark.parametrize("kwargs,error,pattern", FIT_CASES, ids=[str(c[0]) for c in FIT_CASES])
def test_fit_rejects_bad_input_before_training(kwargs, error, pattern):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=pattern):
        fit(m, XY, progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_fit_rejects_bad_data():
    with pytest.raises(ValueError, match="differ in length"):
        fit(model(), (torch.randn(4, 1, 6, 6), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="is empty"):
        fit(model(), (torch.randn(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(TypeError, match=r"'data' parameter of fit must be an \(x, y\) pair"):
        fit(model(), [1, 2, 3])
    with pytest.raises(ValueError, match="prunes a different model"):
        fit(model(), XY, pruner=Pruner(model(), 0.5))


# ================================================================ generated from the declarations
#
# Every public function and class declares its parameters (prunelab._validation.validate_params).
# For every declared constraint of every one of them, an invalid value is generated (out of the
# interval on each side, the wrong type, NaN, a name not among the options) and the call must
# raise ValueError/TypeError naming the parameter and the function, before any work, with all
# other arguments valid. A public function without an entry in VALID_CALLS fails
# test_every_public_callable_has_valid_arguments, so a new one is covered the day it is added.

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from prunelab import _validation as V  # noqa: E402
from prunelab.cli import build_parser, main  # noqa: E402
from prunelab.engine import BatchedModels  # noqa: E402
from prunelab.study import Study  # noqa: E402

#: Packages whose __all__ is the public API, and the public names of modules without one.
PACKAGES = [
    "prunelab",
    "prunelab.pruning",
    "prunelab.metrics",
    "prunelab.models",
    "prunelab.units",
    "prunelab.data",
    "prunelab.engine",
    "prunelab.study",
]
MODULE_NAMES = {
    "prunelab.store": ["Store"],
    "prunelab.export": ["save", "load", "predict_bytes", "export_onnx"],
    "prunelab.hf": ["save_pretrained", "load_pretrained"],
    "prunelab.sparse": ["SparseLinear", "sparsify", "densify", "compare_latency", "inference_latency"],
    "prunelab.training": ["retrain", "RecoveryMonitor"],
}

#: Public callables without declarations, and why.
EXCLUDED = {
    "prunelab.pruning.Criterion": "abstract base class",
    "prunelab.pruning.Granularity": "abstract base class",
    "prunelab.pruning.Regularizer": "abstract base class (L1, L2, GroupLasso declare)",
    "prunelab.pruning.Schedule": "abstract base class",
    "prunelab.pruning.Scope": "abstract base class",
    "prunelab.units.parse_method": "a helper of remove_units and the CLI, which declare 'method'",
    "prunelab.data.dry_run_inputs": "takes any dataset-like object",
    "prunelab.data.takes_token_ids": "takes any object",
}


def public_callables() -> dict[str, object]:
    """``{qualified name: object}`` of every public function and class (first name wins for an
    object exported twice); records (dataclasses), exceptions and parameterless callables left out."""
    found, seen = {}, set()
    names = [(p, n) for p in PACKAGES for n in importlib.import_module(p).__all__]
    names += [(m, n) for m, ns in MODULE_NAMES.items() for n in ns]
    for module, name in names:
        obj = getattr(importlib.import_module(module), name)
        if id(obj) in seen or not callable(obj) or dataclasses.is_dataclass(obj):
            continue
        seen.add(id(obj))
        if isinstance(obj, type) and issubclass(obj, BaseException):
            continue
        fn = obj.__init__ if isinstance(obj, type) else obj
        if fn is object.__init__ or not [p for p in inspect.signature(fn).parameters if p != "self"]:
            continue  # no parameters to declare (Magnitude, Wanda, MaskSet, model_names, ...)
        found[f"{module}.{name}"] = obj
    return found


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3))


X4 = (torch.randn(8, 4), torch.randint(0, 3, (8,)))


def _valid_calls(tmp: Path) -> dict:
    """``{qualified name: (args, kwargs)}``: a call with every argument valid (never run here)."""
    m, t = tiny(), torch.randn(3, 8)
    return {
        "prunelab.Pruner": ((m,), {"sparsity": 0.5}),
        "prunelab.build_model": (("mlp",), {}),
        "prunelab.evaluate": ((m, X4), {}),
        "prunelab.fit": ((m, X4), {}),
        "prunelab.load": ((tmp / "m.plm",), {}),
        "prunelab.load_dataset": (("digits",), {}),
        "prunelab.make_schedule": (("agp", 0.5), {}),
        "prunelab.measure_latency": ((m, (4,)), {}),
        "prunelab.prune": ((m, 0.5), {}),
        "prunelab.save": ((m, tmp / "m.plm"), {}),
        "prunelab.save_pretrained": ((m, tmp), {}),
        "prunelab.summary": ((m, (4,)), {}),
        "prunelab.pruning.AGP": ((0.5,), {}),
        "prunelab.pruning.FixedFraction": ((0.1,), {"n_prunes": 2}),
        "prunelab.pruning.FunctionSchedule": ((lambda step: 0.5,), {}),
        "prunelab.pruning.GradientMagnitude": ((), {}),
        "prunelab.pruning.GroupLasso": ((0.1,), {}),
        "prunelab.pruning.Iterative": ((0.5,), {}),
        "prunelab.pruning.L1": ((0.1,), {}),
        "prunelab.pruning.L2": ((0.1,), {}),
        "prunelab.pruning.LOBS": ((), {}),
        "prunelab.pruning.OBSExact": ((), {}),
        "prunelab.pruning.OBSFast": ((), {}),
        "prunelab.pruning.Wanda": ((), {}),
        "prunelab.pruning.NMGranularity": ((2, 4), {}),
        "prunelab.pruning.OBD": ((), {}),
        "prunelab.pruning.OneShot": ((0.5,), {}),
        "prunelab.pruning.Random": ((), {}),
        "prunelab.pruning.make_criterion": (("magnitude",), {}),
        "prunelab.pruning.make_granularity": (("weight",), {}),
        "prunelab.pruning.make_regularizer": (("l1", 0.1), {}),
        "prunelab.pruning.make_scope": (("local",), {}),
        "prunelab.pruning.nm_keep": ((t, 2, 4), {}),
        "prunelab.pruning.resolve_targets": ((m,), {}),
        "prunelab.metrics.best_index_bits": ((t, 32), {}),
        "prunelab.metrics.count_flops": ((m, (4,)), {}),
        "prunelab.metrics.csr_fillers": ((t, 4), {}),
        "prunelab.metrics.csr_no_fill_bits": ((6, 32, 4), {}),
        "prunelab.metrics.storage_bits": ((t,), {}),
        "prunelab.models.HashedConv2d": ((1, 2, 3), {"compression": 0.5}),
        "prunelab.models.HashedLinear": ((4, 3), {"compression": 0.5}),
        "prunelab.models.hash_layers": ((m, 0.5), {}),
        "prunelab.models.model_options": (("mlp",), {}),
        "prunelab.units.collect_stats": ((m, X4), {}),
        "prunelab.units.prune_transformer": ((m,), {}),
        "prunelab.units.remove_blocks": ((m, "0", []), {}),
        "prunelab.units.remove_units": ((m, "rand"), {"fraction": 0.5, "input_shape": (4,)}),
        "prunelab.units.score_units": ((m, "rand"), {"input_shape": (4,)}),
        "prunelab.units.speed_report": (({"a": m}, X4[0]), {}),
        "prunelab.units.thin": ((m, {}), {}),
        "prunelab.units.thin_dead_units": ((m, (4,)), {}),
        "prunelab.units.zero_units": ((m, (4,)), {}),
        "prunelab.data.data_root": ((), {}),
        "prunelab.data.dataset_info": (("digits",), {}),
        "prunelab.data.fetch": (("digits",), {}),
        "prunelab.data.generate_variant": (("mnist-rot", np.zeros((2, 4, 4), np.uint8), np.zeros(2), 0), {}),
        "prunelab.data.load_text": ((tmp,), {}),
        "prunelab.data.sequences": ((np.arange(10), 4), {}),
        "prunelab.data.train_tokenizer": (("some text",), {}),
        "prunelab.export.predict_bytes": ((m,), {}),
        "prunelab.export.export_onnx": ((m, tmp / "m.onnx", (4,)), {}),
        "prunelab.hf.load_pretrained": ((tmp,), {}),
        "prunelab.sparse.SparseLinear": (
            (4, 3, torch.zeros(4, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)),
            {},
        ),
        "prunelab.sparse.sparsify": ((m, (4,)), {}),
        "prunelab.sparse.densify": ((m,), {}),
        "prunelab.sparse.compare_latency": (({"a": m}, (4,)), {}),
        "prunelab.sparse.inference_latency": ((m, (4,)), {}),
        "prunelab.training.retrain": (
            (m, X4),
            {"pruner": Pruner(tiny(), 0.5), "target_accuracy": 0.5, "eval_data": X4},
        ),
        "prunelab.training.RecoveryMonitor": ((X4, 0.9), {}),
        "prunelab.engine.BatchedModels": (([tiny(), tiny()],), {}),
        "prunelab.engine.fit_batched": ((BatchedModels([tiny(), tiny()]), X4), {"seeds": [0, 1]}),
        "prunelab.engine.available_bytes": ((), {}),
        "prunelab.engine.member_bytes": ((m, (4,), 8), {}),
        "prunelab.engine.cache_members": ((m, (4,), 8), {}),
        "prunelab.engine.choose_members": ((m, (4,), 8), {"wanted": 2}),
        "prunelab.store.Store": ((tmp / "study.db",), {}),
        "prunelab.study.build_study": (({},), {}),
        "prunelab.study.load_spec": ((tmp / "spec.yaml",), {}),
        "prunelab.study.default_db_path": ((Study("s", {}),), {}),
        "prunelab.study.run_study": ((Study("s", {}), tmp / "study.db"), {}),
    }


@pytest.fixture(scope="module")
def valid_calls(tmp_path_factory):
    return _valid_calls(tmp_path_factory.mktemp("calls"))


def test_every_public_callable_has_valid_arguments_or_a_reason(valid_calls):
    public = public_callables()
    missing = sorted(set(public) - set(valid_calls) - set(EXCLUDED))
    assert not missing, f"public callables with no entry in VALID_CALLS (add one, or a reason to EXCLUDED): {missing}"
    undeclared = sorted(n for n in public if n not in EXCLUDED and V.param_constraints(public[n]) is None)
    assert not undeclared, f"public callables without @validate_params: {undeclared}"
    assert not set(valid_calls) - set(public), "VALID_CALLS names something that is not public"


def _where(obj, declared_where, args, kwargs) -> str:
    if not callable(declared_where) or isinstance(declared_where, str):
        return declared_where
    if isinstance(obj, type):
        return declared_where(obj)
    bound = inspect.signature(obj).bind(*args, **kwargs)
    return declared_where(next(iter(bound.arguments.values())))


def _invalid_values(obj) -> list[tuple[str, object]]:
    """``(parameter, value)`` for every invalid value of every declared constraint that no other
    constraint of the parameter accepts."""
    cases = []
    for param, constraints in V.param_constraints(obj)[1].items():
        for c in constraints:
            for value in c.invalid_values():
                if not any(other.is_satisfied_by(value) for other in constraints):
                    cases.append((param, value))
    return cases


DECLARED = sorted(n for n, obj in public_callables().items() if n not in EXCLUDED and V.param_constraints(obj))


def test_the_valid_calls_satisfy_every_declaration(valid_calls):
    public = public_callables()
    for name, (args, kwargs) in valid_calls.items():
        obj = public[name]
        where, declared = V.param_constraints(obj)
        fn = obj.__init__ if isinstance(obj, type) else obj
        bound = inspect.signature(fn).bind(*((None,) if isinstance(obj, type) else ()), *args, **kwargs)
        bound.apply_defaults()
        for param, constraints in declared.items():
            V.check_param(param, bound.arguments[param], constraints, where=name)


def _call_with(obj, args, kwargs, param, value):
    fn = obj.__init__ if isinstance(obj, type) else obj
    positional = list(inspect.signature(fn).parameters)[1 if isinstance(obj, type) else 0 :]
    args = list(args)
    if param in positional[: len(args)]:
        args[positional.index(param)] = value
    else:
        kwargs = {**kwargs, param: value}
    where = _where(obj, V.param_constraints(obj)[0], args, kwargs)
    try:
        obj(*args, **kwargs)
    except (ValueError, TypeError) as err:
        expected = f"the '{param}' parameter of {where} must be "
        return None if expected in str(err) and "Got " in str(err) else f"{param}={value!r}: {err}"
    return f"{param}={value!r}: accepted"


@pytest.mark.parametrize("name", DECLARED)
def test_every_declared_constraint_refuses_an_invalid_value(valid_calls, name):
    """One test per function (fast): each invalid value of each constraint, the others valid."""
    obj = public_callables()[name]
    args, kwargs = valid_calls[name]
    cases = _invalid_values(obj)
    assert cases
    failures = [f for param, value in cases if (f := _call_with(obj, args, kwargs, param, value))]
    assert not failures, f"{name}: " + "; ".join(failures)


def test_every_numeric_parameter_has_an_upper_bound_or_a_reason():
    """An absurd number can only be a mistake: each interval has an upper end, except these."""
    unbounded = {
        ("fit", "lr"),
        ("fit", "weight_decay"),
        ("fit", "temperature"),  # too large diverges: TrainingDiverged
        ("l1 regularizer", "strength"),
        ("l2 regularizer", "strength"),
        ("group-lasso regularizer", "strength"),
        ("Pruner", "min_keep"),
        ("prune", "min_keep"),  # above a layer's size: the layer stays whole
        ("HashedLinear", "buckets"),
        ("HashedConv2d", "buckets"),  # bounded by the layer's virtual weights
        ("lobs criterion", "damping"),
        ("obs-exact criterion", "damping"),
        ("obs-fast criterion", "damping"),
        ("lobs criterion", "epsilon"),
        ("obs-exact criterion", "epsilon"),
        ("obs-fast criterion", "epsilon"),
        ("prune_transformer", "damp"),
    }  # relative ridge dampings: a large one is valid
    found = set()
    for name, obj in public_callables().items():
        declared = V.param_constraints(obj)
        if declared is None or name in EXCLUDED:
            continue
        where = declared[0] if isinstance(declared[0], str) else "?"
        for param, constraints in declared[1].items():
            if any(isinstance(c, V.Interval) and c.high is None for c in constraints):
                found.add((where, param))
    assert found <= unbounded, f"numeric parameters without an upper bound: {sorted(found - unbounded)}"


def test_the_limits_are_documented():
    text = (Path(__file__).resolve().parents[1] / "docs" / "limits.md").read_text()
    for name in dir(V):
        if name.startswith("MAX_"):
            value = getattr(V, name)
            assert name in text and f"{value:,}".replace(",", " ") in text.replace(",", " "), name


# ---------------------------------------------------------------- the command line, from its parser
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


#: Positional arguments that let each command reach its options (never run: an option is bad).
POSITIONALS = {
    "run": ["spec.yaml"],
    "status": ["study.db"],
    "table": ["study.db"],
    "plot": ["study.db"],
    "report": ["study.db"],
    "list": [],
    "data": ["info"],
    "prune": [],
    "units": [],
    "export": ["weights.pt", "out.plm"],
    "summary": ["--model", "mlp"],
}


def _cli_invalid(action: argparse.Action) -> list[str]:
    values = []
    for c in getattr(action.type, "constraints", ()):
        if isinstance(c, V.Interval):
            values += [repr(v) for v in c.invalid_values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
            values.append("abc")
        elif isinstance(c, V.Options):
            values += c.invalid_values()
    if action.choices is not None:
        values.append("no-such-choice")
    return [
        v
        for v in dict.fromkeys(values)
        if not any(c.is_satisfied_by(_parsed(c, v)) for c in getattr(action.type, "constraints", ()))
    ]


def _parsed(constraint, text):
    try:
        return constraint.parse(text)
    except ValueError:
        return None


def _cli_cases():
    cases = []
    for command, sub in sorted(_subparsers(build_parser()).items()):
        for action in sub._actions:
            if not action.option_strings or action.nargs == 0:
                continue
            for text in _cli_invalid(action):
                cases.append(
                    pytest.param(command, action.option_strings[-1], text, id=f"{command}-{action.dest}-{text}")
                )
    return cases


def test_every_numeric_cli_option_declares_its_range():
    for command, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            assert action.type not in (int, float), f"prunelab {command} {action.option_strings}: type={action.type}"


@pytest.mark.parametrize("command,flag,text", _cli_cases())
def test_every_cli_option_refuses_a_bad_value_in_one_line_before_any_work(command, flag, text):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([command, *POSITIONALS[command], flag, text]) == 2
    message = err.getvalue()
    assert message.startswith("prunelab: error: ") and message.count("\n") == 1 and "Traceback" not in message
    assert flag in message or f"'{flag.lstrip('-')}'" in message or re.search(r"invalid choice", message)
