"""Every user mistake raises ValueError/TypeError naming the parameter, value and choices —
before any training starts."""

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
    ({"sparsity": 0.5, "criterion": "magnitde"}, ValueError,
     r"unknown criterion 'magnitde' \(did you mean 'magnitude'\?\).*gradient, lobs, magnitude, obd, obs-exact, obs-fast, random"),
    ({"sparsity": 0.5, "granularity": "filters"}, ValueError, r"unknown granularity 'filters'.*channel, filter, kernel"),
    ({"sparsity": 0.5, "scope": "globl"}, ValueError, r"unknown scope 'globl'.*global, layerwise-constant, local"),
    ({"sparsity": 0.5, "schedule": "cubic"}, ValueError, r"unknown schedule 'cubic'.*agp, fixed-fraction"),
    ({"sparsity": 0.5, "layers": ["fc9"]}, ValueError, r"'layers' parameter of Pruner names 'fc9'.*Valid module names: 0, 3"),
    ({"sparsity": 0.5, "granularity": "kernel", "layers": ["3"]}, ValueError,
     r"granularity 'kernel' applies only to Conv layers; '3.weight' is the 'weight' of a Linear"),
    ({"sparsity": 0.5, "reduction": "max"}, ValueError, r"'reduction' parameter of Pruner must be one of: l2, mean, sum\. Got 'max'"),
    ({"sparsity": 0.5, "min_keep": 0}, ValueError, r"'min_keep' parameter of Pruner must be an int in \[1, inf\]"),
    ({"sparsity": 0.5, "rewind": "start"}, ValueError, r"'rewind' parameter of Pruner must be None, 'init'"),
    ({"sparsity": 0.5, "schedule": "agp", "schedule_args": {"n_prunes": 0}}, ValueError,
     r"'n_prunes' parameter of agp schedule must be an int in \[1, 100000\]\. Got 0"),
    ({"sparsity": 0.5, "schedule": "agp", "schedule_args": {"every": 1.5}}, TypeError, r"'every' parameter of agp schedule"),
    ({"sparsity": 0.5, "schedule": "iterative", "schedule_args": {"exponent": 0.5}}, ValueError,
     r"'exponent' parameter of iterative schedule must be a float in \[1, 1000\]"),
    ({"sparsity": 0.5, "schedule": "agp", "schedule_args": {"n_prune": 3}}, TypeError,
     r"schedule 'agp' got unknown option\(s\) 'n_prune'; valid options: every, initial_sparsity, n_prunes"),
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
    ({"optimizer": "sgdd"}, ValueError, r"'optimizer' parameter of fit must be one of: adam, adamw, sgd\. Got 'sgdd' instead \(did you mean 'sgd'\?\)"),
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
