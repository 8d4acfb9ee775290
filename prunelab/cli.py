"""The ``prunelab`` command line.

    prunelab run SPEC.yaml [--workers N | --executor ray --address auto] [--set K=V] [--quick]
    prunelab status STUDY.db          prunelab table STUDY.db     prunelab plot STUDY.db
    prunelab report STUDY.db          prunelab list [KIND]        prunelab data info|fetch [NAME]
    prunelab prune --dataset digits --model mlp --sparsity 0.9 [...]   (one model, one method)
    prunelab units --dataset digits --model mlp --method bp_abs_mrs --fraction 0.5 [--latency]
    prunelab summary --model lenet5 --dataset mnist [--weights FILE] [--latency]
    prunelab export WEIGHTS OUT.plm [--values int8] [--thin] [--onnx OUT.onnx]

Your own model: ``--model package.module:factory [--model-arg k=v ...] --example-input SPEC``
with prune, units, summary and export (``prunelab.cli_model`` has the grammar of SPEC).

Every argument (and a whole spec) is checked before any work starts; a mistake
prints ``prunelab: error: ...`` naming the bad value and the valid ones.

Exit status: 0 success; 1 a study finished with failed runs; 2 bad input (usage,
spec, names, values, missing files); 3 the study is being run by another process;
4 the store or an output could not be written (disk full, ...; the store is intact);
130 interrupted (Ctrl-C). Set ``PRUNELAB_DEBUG=1`` for full tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from numbers import Integral, Real
from pathlib import Path

from prunelab._files import atomic_write, atomic_write_bytes
from prunelab._validation import (
    BATCH_SIZE,
    EPOCHS,
    FRACTION,
    MAX_EPOCHS,
    MAX_SAMPLES,
    MAX_SEQ_LEN,
    MAX_UNITS,
    MAX_VOCAB,
    SEED,
    SPARSITY,
    THREADS,
    Interval,
    Options,
    check_number,
    cli_type,
)
from prunelab._version import __version__
from prunelab.cli_study import add_study_commands

#: The longest ``KEY=VALUE`` command-line option value read as YAML.
MAX_OPTION_CHARS = 10_000


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``prunelab: error: ...``, exit 2): a bad option value
    reads as the library's template, naming the option, the value and the valid range."""

    def error(self, message: str):
        head, sep, rest = message.partition(": ")
        flags = head.removeprefix("argument ").split("/")
        if head.startswith("argument ") and sep and any(flag.strip("-") in rest for flag in flags):
            text = rest  # our own message already names the option
        else:
            text = f"{message} (see {self.prog} --help)"
        self.exit(2, f"prunelab: error: {text}\n")


def key_value(flag: str):
    """An argparse ``type=`` for ``KEY=VALUE`` options: ``(key, value)`` with the value read as
    plain YAML (``hidden=[300,100]``; no aliases, no repeated keys, bounded length)."""
    import argparse as _argparse

    def parse(text: str) -> tuple[str, object]:
        from prunelab.study._yaml import load_yaml

        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise _argparse.ArgumentTypeError(
                f"{flag} takes key=value, e.g. {flag} hidden=[300,100]. Got {text!r} instead."
            )
        if len(value) > MAX_OPTION_CHARS:
            raise _argparse.ArgumentTypeError(
                f"{flag} {key.strip()}=...: the value is {len(value):,} characters "
                f"long, more than {MAX_OPTION_CHARS:,}."
            )
        try:
            return key.strip(), load_yaml(value)
        except Exception as err:  # yaml.YAMLError and the strict loader's refusals
            why = " ".join(str(err).split())
            raise _argparse.ArgumentTypeError(f"{flag} {key.strip()}={value}: not a YAML value ({why}).") from None

    parse.__name__ = "key=value"
    return parse


def _key_values(pairs: list | None, flag: str) -> dict:
    """``KEY=VALUE`` options as a dict (parsed by :func:`key_value` on the command line; strings
    given directly are parsed here)."""
    import argparse as _argparse

    out = {}
    for pair in pairs or []:
        if isinstance(pair, str):
            try:
                pair = key_value(flag)(pair)
            except _argparse.ArgumentTypeError as err:
                raise ValueError(str(err)) from None
        out[pair[0]] = pair[1]
    return out


def _registries() -> dict:
    from prunelab.data import DATASETS
    from prunelab.models import MODELS
    from prunelab.pruning import CRITERIA, GRANULARITIES, REGULARIZERS, SCHEDULES, SCOPES

    return {
        "criteria": CRITERIA,
        "granularities": GRANULARITIES,
        "scopes": SCOPES,
        "schedules": SCHEDULES,
        "regularizers": REGULARIZERS,
        "models": MODELS,
        "datasets": DATASETS,
    }


# --------------------------------------------------------------------------- the user's own model


def _user_model(args, where: str):
    """``(model, example inputs)`` from ``--model package.module:factory`` and ``--example-input``;
    everything checked before the model is built."""
    from prunelab import cli_model

    if not args.example_input:
        raise ValueError(
            f"{where}: --model {args.model} (your own model) needs --example-input, e.g. {', '.join(cli_model.FORMS)}."
        )
    cli_model.parse_example_input(args.example_input)
    if getattr(args, "dataset", None) is not None or getattr(args, "dataset_arg", None):
        flag = "--dataset" if getattr(args, "dataset", None) is not None else "--dataset-arg"
        raise ValueError(
            f"{where}: {flag} is for registry models; a model from --model package.module:factory "
            f"is pruned without data here (use the Python API, prunelab.prune(model, ..., data=...), "
            f"for data-driven criteria and training)."
        )
    model = cli_model.build_user_model(args.model, _key_values(args.model_arg, "--model-arg"))
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if not floats:
        return model, cli_model.make_example(args.example_input)
    return model, cli_model.make_example(args.example_input, floats[0])


def _print_summary(model, example, where: str, markdown: bool = False):
    """prunelab.summary of the model on its example (a zero input of its shape for one float tensor)."""
    from prunelab.cli_model import single_input_shape
    from prunelab.metrics import summary

    shape = single_input_shape(example)
    stats = summary(model, shape) if shape is not None else summary(model, example_inputs=example)
    print(stats.to_markdown() if markdown else stats)
    return stats


def _refuse_data_driven(needs_data: bool, what: str, where: str) -> None:
    if needs_data:
        raise ValueError(
            f"{where}: {what} needs calibration data, and a model from --model package.module:factory "
            f"has none on the command line; choose a data-free one (magnitude, random; units: "
            f"rand, norm) or use the Python API with data=."
        )


def _prune_user(args) -> int:
    import torch

    from prunelab.export import save
    from prunelab.pruning import CRITERIA, prune

    where = "prunelab prune"
    criterion = CRITERIA.get(args.criterion, param="--criterion", where=where)
    _refuse_data_driven(getattr(criterion, "needs_data", False), f"criterion {args.criterion!r}", where)
    model, example = _user_model(args, where)
    _check_outputs(args, where)
    pruner = prune(
        model,
        args.sparsity,
        criterion=args.criterion,
        granularity=args.granularity,
        scope=args.scope,
        layers=args.layers,
        seed=args.seed,
    )
    _print_summary(model, example, where)
    print(f"\nsparsity of the pruned layers: {pruner.sparsity():.4f} (one-shot {args.criterion}, no training)")
    if args.save:
        atomic_write(args.save, lambda f: torch.save(model.state_dict(), f))
        print(f"saved {args.save} (a state dict)")
    if args.export:
        written = save(model, args.export)
        print(f"exported {args.export}: {written.file_bytes:,} bytes (read it with prunelab.load(path, model=...))")
    if args.json:
        atomic_write_bytes(
            args.json,
            json.dumps(
                {"model": args.model, "criterion": args.criterion, "sparsity": pruner.sparsity()}, indent=2
            ).encode(),
        )
    return 0


def _check_outputs(args, where: str, flags: tuple[str, ...] = ("save", "export", "json")) -> None:
    """Every output file named on the command line can be written: checked (and its folder
    made) before any work; a failure is a StudyWriteError (exit 4) naming the path."""
    from prunelab.store import write_failure

    for flag in flags:
        path = getattr(args, flag, None)
        if not path:
            continue
        name = flag if flag == "out" else f"--{flag}"
        if Path(path).is_dir():
            raise write_failure(f"write {name}", path, IsADirectoryError(21, "it is a folder"), "give a file name")
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_failure(
                f"write {name}",
                path,
                err,
                "its folder cannot be made (is a part of the path a regular file?); choose another path",
            ) from None


def _units_user(args) -> int:
    from prunelab import units
    from prunelab.cli_model import single_input_shape
    from prunelab.export import save

    where = "prunelab units"
    units.parse_method(args.method, where)
    _refuse_data_driven(args.method not in ("rand", "norm"), f"method {args.method!r}", where)
    if (args.fraction is None) == (args.count is None):
        raise ValueError(
            "prunelab units takes exactly one of --fraction (of each layer's units, in [0, 1)) "
            "or --count (units per layer)."
        )
    model, example = _user_model(args, where)
    _check_outputs(args, where)
    layers = args.layers[0] if args.layers and len(args.layers) == 1 else (args.layers or "all")
    shape = single_input_shape(example)  # one float tensor: traced on a zero input, as before
    inputs = {"input_shape": shape} if shape is not None else {"example_inputs": example}
    result = units.remove_units(
        model, args.method, None, fraction=args.fraction, count=args.count, layers=layers, seed=args.seed, **inputs
    )
    found = {layer.name: layer.n_units for layer in result.units.layers}
    thinned = units.thin(model, result)
    print(
        f"units ({args.method}): "
        + ", ".join(f"{name} {n}->{n - len(result.plan.get(name, []))}" for name, n in found.items())
    )
    _print_summary(thinned, example, where)
    if args.save:
        written = save(thinned, args.save)
        print(f"saved {args.save}: {written.file_bytes:,} bytes (prunelab.load(path, model=...) resizes the model)")
    return 0


def cmd_list(args) -> int:
    registries = _registries()
    kinds = [args.kind] if args.kind else list(registries)
    for kind in kinds:
        registry = registries[kind]
        aliases: dict[str, list[str]] = {}
        for alias, name in registry.aliases().items():
            aliases.setdefault(name, []).append(alias)
        names = [f"{n} ({', '.join(sorted(aliases[n]))})" if n in aliases else n for n in registry.names()]
        print(f"{kind}: {', '.join(names)}")
    return 0


def cmd_data(args) -> int:
    from prunelab.data import DATASETS, dataset_info, fetch

    if args.action == "info":
        names = [args.name] if args.name else DATASETS.names()
        for name in names:
            info = dataset_info(name)
            print(json.dumps(info, indent=2, default=str))
        return 0
    if not args.name:
        raise ValueError("prunelab data fetch needs a dataset NAME, one of: " + ", ".join(DATASETS.names()))
    fetch(args.name, root=args.root)
    print(f"{args.name}: files present and checksums verified")
    return 0


def _schedule(args, per_epoch: int):
    from prunelab.pruning import make_schedule

    options = _key_values(args.schedule_arg, "--schedule-arg")
    name = args.schedule
    if name in ("iterative", "root", "agp", "gradual", "fixed-fraction", "fixed_fraction"):
        options.setdefault("every", max(1, round(args.prune_every * per_epoch)))
    if name in ("fixed-fraction", "fixed_fraction"):
        options.setdefault("sparsity", args.sparsity)
        return make_schedule(name, **options)
    return make_schedule(name, args.sparsity, **options)


def cmd_prune(args) -> int:
    import torch

    from prunelab.cli_model import is_user_model
    from prunelab.data import dry_run_inputs, load_dataset
    from prunelab.metrics import summary
    from prunelab.models import build_model
    from prunelab.pruning import Pruner
    from prunelab.training import evaluate, fit, steps_per_epoch

    if is_user_model(args.model):
        return _prune_user(args)
    _registry_only(args, "prunelab prune")
    # everything is validated before the first training step (the numbers while parsing)
    model_args = _key_values(args.model_arg, "--model-arg")
    ds = load_dataset(args.dataset, root=args.data_root, **_key_values(args.dataset_arg, "--dataset-arg"))
    model = build_model(args.model, dataset=ds, seed=args.seed, **model_args)
    per_epoch = steps_per_epoch(len(ds.y_train), args.batch_size)
    schedule = _schedule(args, per_epoch)
    # the Pruner validates everything now and touches no weight until its first event
    n_cal = min(len(ds.y_train), args.calibration)
    pruner = Pruner(
        model,
        schedule=schedule,
        criterion=args.criterion,
        granularity=args.granularity,
        scope=args.scope,
        layers=args.layers,
        seed=args.seed,
        calibration=(ds.x_train[:n_cal], ds.y_train[:n_cal]),
    )
    finetune_steps = args.finetune_epochs * per_epoch
    if schedule.last_step > finetune_steps:
        raise ValueError(
            f"the schedule's last prune is at step {schedule.last_step} but fine-tuning has "
            f"{finetune_steps} steps ({args.finetune_epochs} epochs x {per_epoch}); raise "
            f"--finetune-epochs or lower n_prunes / --prune-every."
        )
    train_kw = dict(
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        regularizer=args.regularizer,
        reg_strength=args.reg_strength,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    _check_outputs(args, "prunelab prune")

    fit(model, ds, epochs=args.epochs, **train_kw)
    scores = [evaluate(model, ds)]
    pruner.update()
    first_sparsity = pruner.sparsity()
    scores.append(evaluate(model, ds))
    fit(model, ds, epochs=args.finetune_epochs, pruner=pruner, **train_kw)
    scores.append(evaluate(model, ds))
    before, right_after, after = (s["accuracy"] for s in scores)
    stats = summary(model, **dry_run_inputs(ds))
    print(stats)
    result = {
        "dataset": ds.name,
        "model": model.config,
        "criterion": args.criterion,
        "granularity": args.granularity,
        "scope": pruner.scope.name,
        "schedule": repr(schedule),
        "accuracy_dense": before,
        "accuracy_after_first_prune": right_after,
        "sparsity_after_first_prune": first_sparsity,
        "accuracy_final": after,
        "sparsity": stats.total.sparsity,
        "compression": stats.total.compression,
        "speedup": stats.total.speedup,
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
    }
    if "perplexity" in scores[0]:  # a language model: token accuracy, and perplexity
        result.update(
            perplexity_dense=scores[0]["perplexity"],
            perplexity_after_first_prune=scores[1]["perplexity"],
            perplexity_final=scores[2]["perplexity"],
        )
        print(
            f"\ntest perplexity: dense {scores[0]['perplexity']:.2f} -> right after the first prune "
            f"{scores[1]['perplexity']:.2f} -> after {args.finetune_epochs} epochs {scores[2]['perplexity']:.2f}"
        )
    what = "token accuracy" if "perplexity" in scores[0] else "accuracy"
    print(
        f"\n{what}: dense {before:.4f} -> right after the first prune (sparsity {first_sparsity:.3f}) "
        f"{right_after:.4f} -> "
        f"after {args.finetune_epochs} epochs {after:.4f}; sparsity {stats.total.sparsity:.4f}, "
        f"compression {stats.total.compression:.2f}x, theoretical speedup {stats.total.speedup:.2f}x"
    )
    if args.save:
        atomic_write(args.save, lambda f: torch.save({"config": model.config, "state_dict": model.state_dict()}, f))
        print(f"saved {args.save}")
    if args.export:
        from prunelab.export import save

        written = save(model, args.export, metadata={k: result[k] for k in ("dataset", "accuracy_final")})
        print(f"exported {args.export}: {written.file_bytes:,} bytes")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2, default=str).encode())
    return 0


def cmd_units(args) -> int:
    import copy

    import torch

    from prunelab import units
    from prunelab.cli_model import is_user_model
    from prunelab.data import dry_run_inputs, load_dataset
    from prunelab.metrics import measure_latency, summary
    from prunelab.models import build_model
    from prunelab.training import evaluate, fit

    if is_user_model(args.model):
        return _units_user(args)
    where = "prunelab units"
    _registry_only(args, where)
    # everything is validated before the first training step
    units.parse_method(args.method, where)
    if (args.fraction is None) == (args.count is None):
        raise ValueError(
            "prunelab units takes exactly one of --fraction (of each layer's units, in [0, 1)) "
            "or --count (units per layer)."
        )
    model_args = _key_values(args.model_arg, "--model-arg")
    _check_outputs(args, where)
    ds = load_dataset(args.dataset, root=args.data_root, **_key_values(args.dataset_arg, "--dataset-arg"))
    dry = dry_run_inputs(ds)  # the input shape, or one sequence of token ids for a language model
    model = build_model(args.model, dataset=ds, seed=args.seed, **model_args)
    if args.weights:  # before finding the units: a thinned file rebuilds a thinner model
        model = _load_weights(model, args.weights)
    layers = args.layers[0] if args.layers and len(args.layers) == 1 else (args.layers or "all")
    found = units.Units.of(model, **dry)
    units.select_layers(found.layers, layers, where=where)
    train_kw = dict(
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        seed=args.seed,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if not args.weights:
        fit(model, ds, epochs=args.epochs, **train_kw)

    dense = evaluate(model, ds)["accuracy"]
    n_cal = min(len(ds.y_train), args.calibration)
    masked = copy.deepcopy(model)
    result = units.remove_units(
        masked,
        args.method,
        (ds.x_train[:n_cal], ds.y_train[:n_cal]),
        fraction=args.fraction,
        count=args.count,
        layers=layers,
        seed=args.seed,
    )
    masked_accuracy = evaluate(masked, ds)["accuracy"]
    thinned = units.thin(masked, result)
    thinned_accuracy = evaluate(thinned, ds)["accuracy"]
    before, after = summary(model, **dry), summary(thinned, **dry)
    shapes = ", ".join(
        f"{name} {found_units.n_units}->{found_units.n_units - len(result.plan.get(name, []))}"
        for name, found_units in ((u.name, u) for u in found.layers)
    )
    theoretical = before.total.flops_dense / after.total.flops
    print(f"units ({args.method}): {shapes}")
    print(
        f"parameters {before.total.params:,} -> {after.total.params:,}; FLOPs {before.total.flops_dense:,} -> "
        f"{after.total.flops:,} (theoretical speedup {theoretical:.2f}x)"
    )
    print(f"accuracy: dense {dense:.4f} -> units removed {masked_accuracy:.4f} (thinned {thinned_accuracy:.4f})")
    out = {
        "dataset": ds.name,
        "model": model.config,
        "method": args.method,
        "layers": layers,
        "fraction": args.fraction,
        "count": args.count,
        "plan": {k: v.tolist() for k, v in result.plan.items()},
        "accuracy_dense": dense,
        "accuracy_removed": masked_accuracy,
        "accuracy_thinned": thinned_accuracy,
        "params_dense": before.total.params,
        "params_thinned": after.total.params,
        "speedup_theoretical": theoretical,
    }
    if args.finetune_epochs:
        fit(thinned, ds, epochs=args.finetune_epochs, **train_kw)
        out["accuracy_finetuned"] = evaluate(thinned, ds)["accuracy"]
        print(f"after {args.finetune_epochs} epochs of fine-tuning: {out['accuracy_finetuned']:.4f}")
    if args.latency:
        rows = []
        for label, net in (("masked", masked), ("thinned", thinned)):
            for r in measure_latency(net, batch_sizes=(1, 64), threads=args.threads, **dry):
                rows.append((label, r))
        median = {(label, r.batch_size): r.median_ms for label, r in rows}
        print(f"latency, median of 50 calls, {rows[0][1].threads} thread(s):")
        for b in (1, 64):
            ratio = median[("masked", b)] / median[("thinned", b)]
            print(
                f"  batch {b:>2}: masked {median[('masked', b)]:.3f} ms, thinned {median[('thinned', b)]:.3f} ms "
                f"-> measured speedup {ratio:.2f}x (theoretical {theoretical:.2f}x)"
            )
            out[f"speedup_measured_b{b}"] = ratio
    if args.save:
        atomic_write(
            args.save,
            lambda f: torch.save({"config": model.config, "plan": out["plan"], "state_dict": thinned.state_dict()}, f),
        )
        print(f"saved {args.save} (prunelab summary --weights reads it)")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(out, indent=2, default=str).encode())
    return 0


def _registry_only(args, where: str) -> None:
    """Registry models keep their dataset default; --example-input is for user models."""
    if getattr(args, "example_input", None):
        raise ValueError(
            f"{where}: --example-input is for your own model (--model package.module:factory); "
            f"the registry model {args.model or '(from the file)'} takes its input shape from "
            f"--dataset."
        )
    if getattr(args, "dataset", "") is None:
        args.dataset = args.dataset_default


def _load_weights(model, path: str):
    """A plain state dict, ``{config, state_dict}`` (prunelab prune --save), a thinned model
    ``{config, plan, state_dict}`` (prunelab units --save) or a prunelab model file (prunelab
    export, prunelab.save): the model to load into is returned. Anything else (a directory, an
    empty or foreign file, a pickle, tensors that do not fit) is a ModelFileError naming the file."""
    import torch

    from prunelab import export

    where = f"load {path!r}"
    if Path(path).is_dir():
        raise export.ModelFileError(
            f"{where}: a directory, not a weights file; give the file written by "
            f"prunelab prune/units --save or prunelab export."
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"{where}: no weights file at {path!r}.")
    start = export.file_start(path)
    if start == export.MAGIC:
        has_architecture = export.read_header(path).get("architecture") is not None
        return export.load(path, model=None if has_architecture else model)
    if not start.startswith(export._TORCH_FILE_STARTS):
        what = "an empty file" if not start else "neither a prunelab model file nor a torch.save file"
        raise export.ModelFileError(
            f"{where}: {what}; give the file written by prunelab prune/units --save or prunelab export."
        )
    config, state = export._read_torch(Path(path), where)
    plan = config.get("_plan") if isinstance(config, dict) else None
    if plan and isinstance(getattr(model, "config", None), dict):
        from prunelab import units

        try:
            plan = {k: torch.tensor(v, dtype=torch.long) for k, v in plan.items()}
        except (TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise export.ModelFileError(f"{where}: its thinning plan is malformed ({err}).") from None
        model = units.thin(model, plan, input_shape=model.config["input_shape"])
    if not isinstance(getattr(model, "config", None), dict):  # a user's model: resize to a thinned state dict
        export.reshape_to(model, {k: tuple(v.shape) for k, v in state.items() if k in model.state_dict()}, where=where)
    export._assign(model, state, where)
    return model


def _brief(err: BaseException, limit: int = 300) -> str:
    """An exception on one line, at most ``limit`` characters of its message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def cmd_export(args) -> int:
    import io

    import torch

    from prunelab import export

    where = "prunelab export"
    export._check_options(args.encoding, args.values, _index_bits(args.index_bits), where)
    if not Path(args.weights).is_file():
        raise FileNotFoundError(f"{where}: no weights file at {args.weights!r}.")
    _check_outputs(args, where, ("out", "onnx"))
    example = None
    from prunelab.cli_model import is_user_model, single_input_shape

    if is_user_model(args.model):
        model, example = _user_model(args, where)
        model = _load_weights(model, args.weights)
    elif args.model:
        _registry_only(args, where)
        from prunelab.data import DATASETS, dataset_info
        from prunelab.models import build_model

        info = dataset_info(DATASETS.canonical(args.dataset, param="dataset", where=where))
        model = build_model(
            args.model,
            input_shape=tuple(info["input_shape"]),
            n_classes=info["n_classes"],
            **_key_values(args.model_arg, "--model-arg"),
        )
        model = _load_weights(model, args.weights)
    else:
        _registry_only(args, where)
        model = export.load(args.weights)
    config = getattr(model, "config", None)  # a registry model's dict (a Hugging Face model has its own)
    input_shape = tuple(config["input_shape"]) if isinstance(config, dict) and "input_shape" in config else None
    if example is not None:
        input_shape = single_input_shape(example)
    elif input_shape is not None and export._input_dtype(model) == torch.long:
        example = torch.zeros((1, *input_shape), dtype=torch.long)  # a registry language model takes token ids
    if args.thin and input_shape is None and example is None:
        raise ValueError(
            f"{where}: --thin needs a registry model (its input shape) or --model "
            f"package.module:factory with --example-input; this file has no architecture."
        )
    if args.onnx and input_shape is None and example is None:
        raise ValueError(
            f"{where}: --onnx needs a registry model (its input shape) or --model "
            f"package.module:factory with --example-input; this file has no architecture."
        )
    dense = io.BytesIO()
    torch.save(model.state_dict(), dense)
    if args.thin:
        from prunelab import units

        model, plan = (
            units.thin_dead_units(model, example_inputs=example)
            if example is not None
            else units.thin_dead_units(model, input_shape)
        )
        print(f"thinned: {sum(len(v) for v in plan.values())} units whose weights are all zero removed")
    report = export.save(
        model, args.out, encoding=args.encoding, values=args.values, index_bits=_index_bits(args.index_bits)
    )
    print(report)
    print(
        f"{report.file_bytes / len(dense.getvalue()):.2%} of torch.save of the model's state dict "
        f"({len(dense.getvalue()):,} bytes{', before thinning' if args.thin else ''})"
    )
    if args.onnx:
        path = (
            export.export_onnx(model, args.onnx, example_inputs=example)
            if example is not None
            else export.export_onnx(model, args.onnx, input_shape)
        )
        print(f"ONNX: {path} ({path.stat().st_size:,} bytes)")
    return 0


def _index_bits(value):
    """--index-bits as parsed (an int or "auto"); a string given to cmd_export directly is read here."""
    if isinstance(value, str) and value != "auto":
        return int(value) if value.lstrip("-").isdigit() else value
    return value


def cmd_summary(args) -> int:
    from prunelab.cli_model import is_user_model
    from prunelab.data import DATASETS
    from prunelab.metrics import summary
    from prunelab.models import build_model

    where = "prunelab summary"
    if is_user_model(args.model):
        return _summary_user(args, where)
    _registry_only(args, where)
    model_args = _key_values(args.model_arg, "--model-arg")
    name = DATASETS.canonical(args.dataset, param="dataset", where=where)
    input_shape, n_classes, dry = _dataset_shape(name, _key_values(args.dataset_arg, "--dataset-arg"), where)
    model = build_model(args.model, input_shape=input_shape, n_classes=n_classes, **model_args)
    if args.weights:
        model = _load_weights(model, args.weights)
    stats = summary(model, **dry)
    print(stats.to_markdown() if args.markdown else stats)
    if args.latency:
        from prunelab.sparse import inference_latency

        print(f"\n{inference_latency(model, min_sparsity=args.min_sparsity, threads=args.threads, **dry)}")
    return 0


def _dataset_shape(name: str, options: dict, where: str) -> tuple[tuple[int, ...], int, dict]:
    """``(input_shape, n_classes, dry-run inputs)`` of a registry dataset without loading it: a text
    dataset's from its ``seq_len`` and ``vocab_size`` options (token ids of id 0), another's from its info."""
    from prunelab.data import DATASETS, dataset_info
    from prunelab.data.examples import token_example

    source = DATASETS.get(name)
    unknown = sorted(set(options) - set(source.options))
    if unknown:
        raise ValueError(
            f"{where}: --dataset-arg {unknown[0]} is not an option of dataset '{name}'; valid: "
            f"{', '.join(source.options) or 'none'}."
        )
    if not hasattr(source, "token_streams"):
        if options:
            raise ValueError(
                f"{where}: --dataset-arg does not change the input shape of dataset '{name}'; leave it out."
            )
        info = dataset_info(name)
        return tuple(info["input_shape"]), info["n_classes"], {"input_shape": tuple(info["input_shape"])}
    from prunelab.data.text import DEFAULT_SEQ_LEN, DEFAULT_VOCAB

    seq_len = check_number(
        "seq_len", options.get("seq_len", DEFAULT_SEQ_LEN), where=where, low=1, high=MAX_SEQ_LEN, integer=True
    )
    vocab = check_number(
        "vocab_size", options.get("vocab_size") or DEFAULT_VOCAB, where=where, low=2, high=MAX_VOCAB, integer=True
    )
    return (seq_len,), vocab, {"example_inputs": token_example(seq_len)}


def _summary_user(args, where: str) -> int:
    from prunelab.sparse import inference_latency

    model, example = _user_model(args, where)
    if args.weights:
        model = _load_weights(model, args.weights)
    _print_summary(model, example, where, args.markdown)
    if args.latency:
        result = inference_latency(model, example_inputs=example, min_sparsity=args.min_sparsity, threads=args.threads)
        print(f"\n{result}")
    return 0


EXAMPLE_HELP = (
    "the inputs of your own model (--model package.module:factory), e.g. float:1x3x32x32 or "
    "input_ids=int:1x16:0-1000,attention_mask=ones:1x16"
)


#: The ranges of the numeric options; each option declares its own once, in build_parser.
PRUNE_EVERY = Interval(Real, 0, MAX_EPOCHS, closed="right")
CALIBRATION = Interval(Integral, 1, MAX_SAMPLES)
LR = Interval(Real, 0, None, closed="neither")
STRENGTH = Interval(Real, 0, None)
COUNT = Interval(Integral, 1, MAX_UNITS)
INDEX_BITS = Interval(Integral, 1, 16)


def _number(p: argparse.ArgumentParser, flag: str, *constraints, **kwargs) -> None:
    """An option whose value must satisfy ``constraints``, checked while the command line is parsed."""
    p.add_argument(flag, type=cli_type(flag, p.prog, *constraints), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="prunelab", description="Neural-network pruning and compression.")
    parser.add_argument("--version", action="version", version=f"prunelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    add_study_commands(sub)

    p = sub.add_parser("list", help="list the names usable in Python, the CLI and study specs")
    p.add_argument(
        "kind",
        nargs="?",
        choices=["criteria", "granularities", "scopes", "schedules", "regularizers", "models", "datasets"],
    )
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("data", help="dataset files: where they go, and download with checksums")
    p.add_argument("action", choices=["info", "fetch"])
    p.add_argument("name", nargs="?")
    p.add_argument("--root", default=None, help="data root (default: $PRUNELAB_DATA, then the cache)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("prune", help="train, prune and fine-tune one model; print its metrics")
    p.add_argument("--dataset", default=None, help="a registry dataset (default digits; not with your own model)")
    p.add_argument("--example-input", default=None, metavar="SPEC", help=EXAMPLE_HELP)
    p.set_defaults(dataset_default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--dataset-arg",
        action="append",
        type=key_value("--dataset-arg"),
        metavar="KEY=VALUE",
        help="a dataset option, e.g. vocab_size=4096 and seq_len=64 for a text dataset (pydocs)",
    )
    p.add_argument("--model", default="mlp", help="a registry name, or package.module:factory (your own model)")
    p.add_argument(
        "--model-arg", action="append", type=key_value("--model-arg"), metavar="KEY=VALUE", help="e.g. hidden=[300,100]"
    )
    _number(p, "--sparsity", SPARSITY, default=0.9)
    p.add_argument("--criterion", default="magnitude")
    p.add_argument("--granularity", default="weight")
    p.add_argument(
        "--scope",
        default=None,
        help="local, global, layerwise-constant or row (default: the criterion's own; row for wanda)",
    )
    p.add_argument("--schedule", default="one-shot")
    p.add_argument(
        "--schedule-arg", action="append", type=key_value("--schedule-arg"), metavar="KEY=VALUE", help="e.g. n_prunes=5"
    )
    _number(
        p,
        "--prune-every",
        PRUNE_EVERY,
        default=1.0,
        help="epochs between prunes of iterative/agp/fixed-fraction schedules",
    )
    p.add_argument("--layers", nargs="+", default=None, help="module or parameter names to prune")
    _number(
        p,
        "--calibration",
        CALIBRATION,
        default=1024,
        help="training samples used by data-driven criteria (gradient, obd, lobs, obs-*)",
    )
    _number(p, "--epochs", EPOCHS, default=10, help="dense training epochs")
    _number(p, "--finetune-epochs", EPOCHS, default=5, help="epochs from the first prune on")
    _number(p, "--batch-size", BATCH_SIZE, default=64)
    _number(p, "--lr", LR, default=0.05)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--regularizer", default=None)
    _number(p, "--reg-strength", STRENGTH, default=None)
    _number(p, "--seed", SEED, default=0)
    p.add_argument("--save", default=None, help="write {config, state_dict} with torch.save")
    p.add_argument(
        "--export",
        default=None,
        metavar="PATH",
        help="write the pruned model as a compressed prunelab model file (prunelab.load reads it)",
    )
    p.add_argument("--json", default=None, help="write the result as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("units", help="train a model, remove units (neurons/filters), thin it, measure it")
    p.add_argument("--dataset", default=None, help="a registry dataset (default digits; not with your own model)")
    p.add_argument("--example-input", default=None, metavar="SPEC", help=EXAMPLE_HELP)
    p.set_defaults(dataset_default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--dataset-arg",
        action="append",
        type=key_value("--dataset-arg"),
        metavar="KEY=VALUE",
        help="a dataset option, e.g. vocab_size=4096 and seq_len=64 for a text dataset (pydocs)",
    )
    p.add_argument("--model", default="mlp", help="a registry name, or package.module:factory (your own model)")
    p.add_argument(
        "--model-arg", action="append", type=key_value("--model-arg"), metavar="KEY=VALUE", help="e.g. hidden=[300,100]"
    )
    p.add_argument(
        "--method",
        default="bp_abs_mrs",
        help="one of the 12: rand, norm, rs, abs_rs, mrs, abs_mrs, "
        "each optionally with the bp_ prefix (mean replacement)",
    )
    _number(p, "--fraction", SPARSITY, default=None, help="of each chosen layer's units")
    _number(p, "--count", COUNT, default=None, help="units per chosen layer")
    p.add_argument(
        "--layers",
        nargs="+",
        default=None,
        help="all (default), first_conv, middle_conv, last_conv, first_dense, or layer or unit-group "
        "names (e.g. transformer.h.0.attn:heads)",
    )
    _number(p, "--calibration", CALIBRATION, default=1000, help="training samples used to score the units")
    p.add_argument("--weights", default=None, help="start from these weights instead of training")
    _number(p, "--epochs", EPOCHS, default=10, help="dense training epochs (without --weights)")
    _number(p, "--finetune-epochs", EPOCHS, default=0, help="fine-tune the thinned model")
    _number(p, "--batch-size", BATCH_SIZE, default=64)
    _number(p, "--lr", LR, default=0.05)
    p.add_argument("--optimizer", default="sgd")
    _number(p, "--seed", SEED, default=0)
    p.add_argument("--latency", action="store_true", help="measure masked vs thinned latency (batch 1, 64)")
    _number(p, "--threads", THREADS, default=None, help="torch threads for --latency")
    p.add_argument("--save", default=None, help="write the thinned model {config, plan, state_dict}")
    p.add_argument("--json", default=None, help="write the result as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_units)

    p = sub.add_parser("export", help="write a pruned/thinned/hashed model as a small file (and ONNX)")
    p.add_argument("weights", help="prunelab prune/units --save file, or a prunelab model file")
    p.add_argument("out", help="the model file to write (read it with prunelab.load)")
    p.add_argument(
        "--model",
        default=None,
        help="for weights files without an architecture: a registry name or package.module:factory (your own model)",
    )
    p.add_argument(
        "--dataset", default=None, help="with a registry --model: sets the input shape and classes (default mnist)"
    )
    p.add_argument("--example-input", default=None, metavar="SPEC", help=EXAMPLE_HELP)
    p.set_defaults(dataset_default="mnist")
    p.add_argument("--model-arg", action="append", type=key_value("--model-arg"), metavar="KEY=VALUE")
    p.add_argument("--encoding", default="auto", help="auto (smallest per tensor), dense, bitmask or csr")
    p.add_argument("--values", default="float32", help="weights as float32 (exact), float16 or int8")
    _number(
        p,
        "--index-bits",
        Options({"auto"}),
        INDEX_BITS,
        default="auto",
        help="CSR relative-index bits, 1-16, or auto (per tensor)",
    )
    p.add_argument("--thin", action="store_true", help="first remove units whose weights are all zero")
    p.add_argument("--onnx", default=None, metavar="PATH", help="also write ONNX (needs prunelab[onnx])")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("summary", help="per-layer parameters, sparsity, FLOPs and storage of a model")
    p.add_argument("--model", required=True, help="a registry name, or package.module:factory (your own model)")
    p.add_argument(
        "--dataset", default=None, help="sets the input shape and classes of a registry model (default mnist)"
    )
    p.add_argument("--example-input", default=None, metavar="SPEC", help=EXAMPLE_HELP)
    p.set_defaults(dataset_default="mnist")
    p.add_argument(
        "--dataset-arg",
        action="append",
        type=key_value("--dataset-arg"),
        metavar="KEY=VALUE",
        help="a dataset option, e.g. vocab_size=4096 and seq_len=64 for a text dataset (pydocs)",
    )
    p.add_argument("--model-arg", action="append", type=key_value("--model-arg"), metavar="KEY=VALUE")
    p.add_argument("--weights", default=None, help="a file written by prunelab prune --save")
    p.add_argument("--markdown", action="store_true")
    p.add_argument(
        "--latency",
        action="store_true",
        help="median latency (batch 1, 64) as is, with sparse Linear layers, and thinned",
    )
    _number(
        p,
        "--min-sparsity",
        FRACTION,
        default=0.9,
        help="for --latency: Linear layers at least this sparse run as CSR (default 0.9)",
    )
    _number(p, "--threads", THREADS, default=None, help="torch threads for --latency")
    p.set_defaults(func=cmd_summary)
    return parser


def _one_line_warnings():
    """How the command line shows a warning: one line on stderr, ``prunelab: warning: …``, and a
    message it has shown already is not repeated (planning a study may meet the same tied weight
    once per method). Python's own format adds the source file and line, which mean nothing here."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip()
        if not text.startswith(category.__name__) and not category.__module__.startswith("prunelab"):
            text = f"{category.__name__}: {text}"  # another library's: say which kind
        if text not in shown:
            shown.add(text)
            print(f"prunelab: warning: {text}", file=sys.stderr if file is None else file)

    return show


def main(argv: list[str] | None = None) -> int:
    from prunelab.store import StudyWriteError
    from prunelab.study.lock import StudyLocked

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # a bad option (one line printed), --help or --version
        return stop.code if isinstance(stop.code, int) else 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings()
            return args.func(args)
    except StudyLocked as err:
        print(f"prunelab: error: {err}", file=sys.stderr)
        return 3
    except StudyWriteError as err:  # disk full, unwritable output: the store is intact
        print(f"prunelab: error: {err}", file=sys.stderr)
        return 4
    except (ValueError, TypeError, FileNotFoundError) as err:
        if os.environ.get("PRUNELAB_DEBUG"):
            raise
        print(f"prunelab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunelab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `prunelab ... | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a file that could not be written (or read) on the way
        if os.environ.get("PRUNELAB_DEBUG"):
            raise
        print(f"prunelab: error: {err}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
