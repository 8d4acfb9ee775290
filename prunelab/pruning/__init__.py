"""Pruning: targets → criteria → granularity → scope → schedule → Pruner."""

from prunelab.pruning.criteria import CRITERIA, Criterion, GradientMagnitude, Magnitude, Random, make_criterion
from prunelab.pruning.granularity import GRANULARITIES, Granularity, NMGranularity, make_granularity, nm_keep
from prunelab.pruning.lobs import LOBS, LayerReport, OBSExact, OBSFast
from prunelab.pruning.masks import MaskSet
from prunelab.pruning.obd import OBD
from prunelab.pruning.problems import LayerProblem, LayerSolution, SolveRequest
from prunelab.pruning.pruner import Pruner, PruneRecord, SparsityShortfall, prune
from prunelab.pruning.regularizers import L1, L2, REGULARIZERS, GroupLasso, Regularizer, make_regularizer
from prunelab.pruning.schedules import (
    AGP,
    SCHEDULES,
    FixedFraction,
    FunctionSchedule,
    Iterative,
    OneShot,
    Schedule,
    make_schedule,
)
from prunelab.pruning.scopes import SCOPES, Allocation, LayerGroups, Scope, make_scope
from prunelab.pruning.targets import Target, resolve_targets
from prunelab.pruning.wanda import Wanda

__all__ = [
    "AGP",
    "CRITERIA",
    "Criterion",
    "FixedFraction",
    "FunctionSchedule",
    "GRANULARITIES",
    "GradientMagnitude",
    "Granularity",
    "GroupLasso",
    "Iterative",
    "L1",
    "L2",
    "LOBS",
    "LayerReport",
    "Magnitude",
    "OBSExact",
    "OBSFast",
    "MaskSet",
    "NMGranularity",
    "OBD",
    "OneShot",
    "PruneRecord",
    "Pruner",
    "REGULARIZERS",
    "Random",
    "Regularizer",
    "SCHEDULES",
    "SCOPES",
    "Schedule",
    "Scope",
    "SparsityShortfall",
    "Target",
    "make_criterion",
    "make_granularity",
    "make_regularizer",
    "make_schedule",
    "make_scope",
    "nm_keep",
    "prune",
    "resolve_targets",
    "Wanda",
    "Allocation",
    "LayerGroups",
    "LayerProblem",
    "LayerSolution",
    "SolveRequest",
]
