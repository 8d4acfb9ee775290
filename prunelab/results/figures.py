"""The figure machinery of a study's results: the kind registry, declarations, drawing and writing.

Figure kinds live in the :data:`FIGURES` registry: a kind is a function
``(records, declaration, spec) -> [(name, matplotlib.figure.Figure), ...]``, registered with
:func:`figure_kind`; ``declaration`` is one entry of the spec's ``outputs.figures`` (default
``[{kind: accuracy_vs_params}]``). The kinds come in families, one module each, all registered by
:mod:`prunelab.results`: the sweep figures (:mod:`~prunelab.results.sweep_kinds`: accuracy against
parameters or sparsity, trade-offs, weight histograms, training curves, retraining) and study B's
unit-pruning figures (:mod:`~prunelab.results.unit_kinds`).

Matplotlib is imported inside the functions (no import-time side effects) and
figures are built with :class:`matplotlib.figure.Figure`, which needs no pyplot
state or GUI backend.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prunelab._validation import check_choice
from prunelab.registry import Registry
from prunelab.results.outputs import default_output_folder, output_folder, write_output
from prunelab.results.records import check_keys, open_study, raise_problems, require_done
from prunelab.store import RunRecord

FigureFunction = Callable[[list[RunRecord], dict, dict], list]
FIGURES: Registry[FigureFunction] = Registry("figure kind")
#: Keys each built-in kind accepts (kinds registered elsewhere are not key-checked).
FIGURE_KEYS: dict[str, tuple[str, ...]] = {}
DEFAULT_FIGURES = ({"kind": "accuracy_vs_params"},)
FORMATS = ("png", "svg")
DPI = 100
PANEL_SIZE = (5.0, 3.6)  # inches per panel
_COMMON_KEYS = ("kind", "name", "title", "metric")


def figure_kind(name: str, keys: Sequence[str]) -> Callable[[FigureFunction], FigureFunction]:
    def register(function: FigureFunction) -> FigureFunction:
        FIGURE_KEYS[name] = (*_COMMON_KEYS, *keys)
        return FIGURES.register(name)(function)

    return register


# ------------------------------------------------------------------------------ shared pieces
def panel_grid(n_panels: int, *, ncols: int = 3, panel: tuple[float, float] = PANEL_SIZE, per_panel: int = 1):
    """A constrained-layout Figure with ``n_panels`` panels (each ``per_panel`` axes wide)."""
    from matplotlib.figure import Figure

    cols = min(ncols, n_panels) if per_panel == 1 else per_panel
    rows = math.ceil(n_panels / cols) if per_panel == 1 else n_panels
    figure = Figure(figsize=(panel[0] * cols, panel[1] * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).ravel().tolist()
    if per_panel == 1:
        for ax in axes[n_panels:]:
            ax.set_visible(False)
        axes = axes[:n_panels]
    return figure, axes


def figure_name(declaration: dict, kind: str) -> str:
    name = declaration.get("name", kind)
    if not isinstance(name, str) or not name:
        raise TypeError(f"the 'name' parameter of figure {kind} must be a non-empty str. Got {name!r} instead.")
    return name


# ------------------------------------------------------------------------------- declarations
def figure_declarations(spec: dict) -> list[dict]:
    """The spec's ``outputs.figures`` (default ``[{kind: accuracy_vs_params}]``), all checked first."""
    outputs = (spec or {}).get("outputs") or {}
    declarations = outputs.get("figures")
    if declarations is None:
        return [dict(d) for d in DEFAULT_FIGURES]
    if not isinstance(declarations, list):
        raise TypeError(
            f"outputs.figures must be a list of figure declarations. Got {declarations!r} "
            f"of type {type(declarations).__name__} instead."
        )
    raise_problems(figures_problems(declarations))
    return declarations


def figures_problems(declarations: Any) -> list[str]:
    """Problems of an ``outputs.figures`` list found without the runs (for spec validation)."""
    if declarations is None:
        return []
    if not isinstance(declarations, list):
        return [
            f"outputs.figures must be a list of figure declarations. Got {declarations!r} "
            f"of type {type(declarations).__name__} instead."
        ]
    return [p for i, d in enumerate(declarations) for p in figure_problems(d, f"outputs.figures[{i}]")]


def figure_problems(declaration: Any, where: str) -> list[str]:
    """Problems of one figure declaration that can be found without the runs (for spec validation)."""
    if not isinstance(declaration, dict) or "kind" not in declaration:
        return [
            f"{where} must be a mapping with a 'kind' among: {', '.join(FIGURES.names())}. Got {declaration!r} instead."
        ]
    try:
        kind = FIGURES.canonical(declaration["kind"], param="kind", where=where)
    except (ValueError, TypeError) as err:
        return [str(err)]
    if kind in FIGURE_KEYS:
        return check_keys(declaration, FIGURE_KEYS[kind], where=where)
    return []


def build_figures(records: list[RunRecord], spec: dict, declaration: dict, index: int = 0) -> list:
    """The ``(name, Figure)`` pairs of one declaration; errors name the declaration."""
    function = FIGURES.get(declaration["kind"], param="kind")
    try:
        return function(records, declaration, spec)
    except (ValueError, TypeError) as err:
        raise type(err)(f"outputs.figures[{index}] ({declaration['kind']}): {err}") from None


def unique_names(names: Sequence[str]) -> list[str]:
    """``a, a, b`` → ``a, a-2, b`` (file stems)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def write_figures(
    store_path: str | Path, out_dir: str | Path | None = None, formats: Sequence[str] = FORMATS
) -> list[Path]:
    """Write every declared figure of a study as ``<name>.png`` / ``.svg``; returns the paths.

    ``out_dir`` defaults to :func:`~prunelab.results.outputs.default_output_folder` (``figures/``
    beside ``study.db``, ``<db stem>_figures/`` beside another store). Prints nothing.
    """
    if isinstance(formats, str):
        formats = [formats]
    formats = [check_choice("format", f, FORMATS, where="plot") for f in formats]
    study = open_study(store_path)
    require_done(study, "prunelab plot")  # a clear error when nothing has finished
    declarations = figure_declarations(study.spec)
    figures = [pair for i, d in enumerate(declarations) for pair in build_figures(study.records, study.spec, d, i)]
    out = output_folder(Path(out_dir) if out_dir is not None else default_output_folder(study.path, "figures"))
    paths = []
    for name, (_, figure) in zip(unique_names([n for n, _ in figures]), figures):
        for ext in formats:
            buffer = io.BytesIO()  # rendered in memory, then written atomically
            save_figure(figure, buffer, ext)
            paths.append(write_output(out / f"{name}.{ext}", buffer.getvalue()))
    return paths


def save_figure(figure, target, ext: str) -> None:
    """Save without timestamps in the metadata, so that the same runs give the same files."""
    metadata = {"Date": None} if ext == "svg" else None
    figure.savefig(target, format=ext, dpi=DPI, metadata=metadata)
