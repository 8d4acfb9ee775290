"""Unit pruning: score neurons and filters, remove them (optionally replacing them by their
mean output), and thin the model physically. Evci et al., ICLR 2019 submission;
docs/methods.md §5–6.

    from prunelab import units
    result = units.remove_units(model, "bp_abs_mrs", data=(x_cal, y_cal), fraction=0.1)
    small = units.thin(model, result)            # a genuinely smaller model, same outputs

The 12 methods are the scorers ``rand``, ``norm``, ``rs``, ``abs_rs``, ``mrs``,
``abs_mrs``, each without or with mean replacement (the ``bp_`` prefix, for bias
propagation). ``layers`` picks the unit layers: ``"all"``, ``"first_conv"``,
``"middle_conv"``, ``"last_conv"``, ``"first_dense"``, one name or a list. Every
chosen layer loses ``fraction`` of its units (or ``count`` units); a layer is never
emptied.

A plain chain of Linear/Conv2d layers (the registry's models) is handled layer by layer
(:mod:`~prunelab.units.structure`, :mod:`~prunelab.units.surgery`). Any other model is split into
*unit groups* of coupled units, each scored, removed and thinned as one
(:mod:`~prunelab.units.groups`): residual streams and depthwise convs through Torch-Pruning's graph
(:mod:`~prunelab.units.graph`), transformer MLP neurons and attention heads
(:mod:`~prunelab.units.attention`), embeddings feeding a recurrent layer
(:mod:`~prunelab.units.recurrent`). Calibration data are batches as the model takes them
(:mod:`prunelab.inputs`). The functions themselves are in :mod:`~prunelab.units.removal` (and
:mod:`~prunelab.units.transformer`, :mod:`~prunelab.units.report`); this package exports them, and
its modules import one another, never the package.
"""

from __future__ import annotations

from prunelab.units import surgery
from prunelab.units.groups import GroupStats, UnitGroup
from prunelab.units.removal import (
    METHODS,
    SEQUENCE_MODULES,
    UnitPruning,
    Units,
    collect_stats,
    parse_method,
    remove_units,
    score_units,
    thin,
    thin_dead_units,
    thinned_parameters,
    zero_units,
)
from prunelab.units.report import SpeedReport, speed_report
from prunelab.units.scoring import SCORERS, UNIT_SCORERS, UnitStats, collect, needs_data, select
from prunelab.units.structure import (
    LAYER_SETS,
    Chain,
    UnitLayer,
    analyze,
    select_layers,
    unsupported_activation,
)
from prunelab.units.transformer import StructuredPruning, prune_transformer, remove_blocks

__all__ = [
    "LAYER_SETS",
    "METHODS",
    "SCORERS",
    "SpeedReport",
    "StructuredPruning",
    "UnitGroup",
    "UnitPruning",
    "UnitStats",
    "Units",
    "collect_stats",
    "parse_method",
    "prune_transformer",
    "remove_blocks",
    "remove_units",
    "score_units",
    "speed_report",
    "thin",
    "thin_dead_units",
    "zero_units",
]
