"""prunelab: neural-network pruning and compression for PyTorch, with honest measurements.

import prunelab
ds = prunelab.load_dataset("digits")
model = prunelab.build_model("mlp", dataset=ds, hidden=[100], seed=0)
prunelab.fit(model, ds, epochs=30)
pruner = prunelab.prune(model, 0.9, criterion="magnitude", scope="global")
prunelab.fit(model, ds, epochs=10, pruner=pruner)      # fine-tune, zeros kept
print(prunelab.evaluate(model, ds), prunelab.summary(model, ds.input_shape))
prunelab.save(model, "model.plm")                       # compressed file; prunelab.load reads it
"""

from prunelab._version import __version__
from prunelab.data import Dataset, load_dataset
from prunelab.export import load, save
from prunelab.hf import save_pretrained
from prunelab.metrics import measure_latency, summary
from prunelab.models import build_model
from prunelab.pruning import Pruner, make_schedule, prune
from prunelab.training import TrainingDiverged, evaluate, fit

__all__ = [
    "Dataset",
    "Pruner",
    "TrainingDiverged",
    "__version__",
    "build_model",
    "evaluate",
    "fit",
    "load",
    "load_dataset",
    "make_schedule",
    "measure_latency",
    "prune",
    "save",
    "save_pretrained",
    "summary",
]
