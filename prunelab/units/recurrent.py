"""The unit group of an embedding that feeds a recurrent layer: its output dimensions.

An ``nn.Embedding`` whose output is the input of an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (found by
tracing one example with hooks: the same tensor object) gives a group of ``embedding_dim`` units:
the embedding's columns (the producer) and the recurrent layer's first-layer input weights
``weight_ih_l0[_reverse]`` (the point). Masked removal zeroes the columns; thinning cuts both and
sets ``input_size``; mean replacement folds ``W_ih[:, f]·ā_f`` into ``bias_ih_l0[_reverse]``. The
recurrent hidden units themselves are not units: they feed back into every time step.
"""

from __future__ import annotations

import torch
from torch import nn

from prunelab._hooks import eval_mode
from prunelab.inputs import Batch
from prunelab.units.groups import Axis, Point, UnitGroup


def find(model: nn.Module, batch: Batch) -> list[UnitGroup]:
    outputs: dict[int, nn.Embedding] = {}
    feeds: list[tuple[nn.Embedding, nn.RNNBase]] = []

    def embedding_hook(module, inputs, output):
        outputs[id(output)] = module

    def rnn_hook(module, inputs):
        source = outputs.get(id(inputs[0]))
        if source is not None:
            feeds.append((source, module))

    handles = [m.register_forward_hook(embedding_hook) for m in model.modules() if isinstance(m, nn.Embedding)]
    handles += [m.register_forward_pre_hook(rnn_hook) for m in model.modules() if isinstance(m, nn.RNNBase)]
    try:
        with eval_mode(model), torch.no_grad():
            batch.call(model)
    finally:
        for h in handles:
            h.remove()
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for embedding, rnn in dict(feeds).items():
        n = embedding.embedding_dim
        index = torch.arange(n).view(n, 1)
        column = Axis(embedding, "weight", 1, index)
        suffixes = ("", "_reverse") if rnn.bidirectional else ("",)
        inputs = [Axis(rnn, f"weight_ih_l0{s}", 1, index) for s in suffixes]
        point = Point(
            rnn,
            names[rnn],
            -1,
            index,
            batch_dim=0 if rnn.batch_first else 1,
            weights=tuple(f"weight_ih_l0{s}" for s in suffixes),
            biases=tuple(f"bias_ih_l0{s}" for s in suffixes),
        )
        groups.append(
            UnitGroup(
                names[embedding],
                "dense",
                n,
                zero=[column],
                points=[point],
                rows=[column],
                cuts=[column, *inputs],
                module=embedding,
                members=[names[embedding], names[rnn]],
            )
        )
    return groups
