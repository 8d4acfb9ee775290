"""Model zoo: every architecture is built by name through :func:`build_model`.

>>> from prunelab.models import build_model
>>> model = build_model("mlp", input_shape=(1, 28, 28), n_classes=10, hidden=[100], seed=0)

Registered families (one file each): ``mlp`` and ``lenet-300-100``
(:mod:`.mlp`), ``lenet5`` (:mod:`.lenet`), ``conv-pool-linear``,
``small_conv`` and ``medium_conv`` (:mod:`.conv`), ``vgg11`` (:mod:`.vgg`), and the
language models ``gpt`` (:mod:`.gpt`) and ``lstm-lm`` (:mod:`.lstm_lm`), whose ``n_classes`` is
the vocabulary and ``input_shape`` ``(sequence length,)``.
Register your own with ``@MODELS.register("name")``; see ``docs/models.md``.
Any of them takes ``hashed=c`` for HashedNets layers (:mod:`.hashed`).
"""

from prunelab.models.hashed import HashedConv2d, HashedLinear, hash_layers
from prunelab.models.registry import MODELS, build_model, model_names, model_options

# Imported for their registrations.
from prunelab.models import conv, gpt, lenet, lstm_lm, mlp, vgg  # noqa: E402,F401  isort: skip

__all__ = ["MODELS", "HashedConv2d", "HashedLinear", "build_model", "hash_layers", "model_names", "model_options"]
