"""prunelab.inputs: batches and outputs in the forms users' models take and give."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from prunelab.inputs import (
    IGNORE_INDEX,
    Batch,
    as_batch,
    default_loss,
    example_batch,
    forward_batches,
    inputs_batch,
    iter_batches,
    logits_of,
    make_loss,
)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, x, z, *, scale=1.0):
        return (self.a(x) + self.b(z)) * scale


def test_batch_forms_are_read_by_the_documented_rules():
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    b = as_batch((x, y), where="t")
    assert b.args[0] is x and b.targets is y and not b.kwargs
    b = as_batch(x, where="t")
    assert b.args == (x,) and b.targets is None
    b = as_batch((x, x, x), where="t")  # three positional inputs, no targets
    assert len(b.args) == 3 and b.targets is None
    b = as_batch(((x, torch.randn(5, 4)), y), where="t")  # positional inputs with targets
    assert len(b.args) == 2 and b.targets is y
    ids = torch.randint(0, 9, (5, 6))
    b = as_batch({"input_ids": ids, "labels": ids}, where="t")
    assert b.kwargs == {"input_ids": ids} and b.targets is ids and b.hf_labels
    b = as_batch(({"input_ids": ids}, y), where="t")
    assert b.kwargs == {"input_ids": ids} and b.targets is y and not b.hf_labels
    assert as_batch((x, None), where="t").targets is None


def test_calling_a_model_with_positional_and_keyword_inputs():
    model = TwoInputs()
    x, z = torch.randn(2, 3), torch.randn(2, 4)
    expected = model(x, z)
    assert torch.equal(as_batch(((x, z), None), where="t").call(model), expected)
    assert torch.equal(Batch((x,), {"z": z}).call(model), expected)
    assert torch.equal(inputs_batch({"x": x, "z": z}, where="t").call(model), expected)


def test_iter_batches_slices_pairs_and_dicts_and_reads_dataloaders():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    sizes = [b.size for b in iter_batches((x, y), 4, where="t")]
    assert sizes == [4, 4, 2]
    parts = list(iter_batches({"input_ids": torch.zeros(10, 5, dtype=torch.long), "labels": y}, 3, where="t"))
    assert [p.size for p in parts] == [3, 3, 3, 1] and all(p.hf_labels for p in parts)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    got = list(iter_batches(loader, 99, where="t"))
    assert len(got) == 4 and torch.equal(torch.cat([b.args[0] for b in got]), x)
    assert torch.equal(torch.cat([b.targets for b in got]), y)


@pytest.mark.parametrize(
    "data, message",
    [
        ((torch.randn(0, 3), torch.zeros(0)), "empty calibration set"),
        ([], "empty calibration set"),
        ((torch.randn(4, 3), torch.zeros(5)), "differ in length"),
        ((torch.full((2, 3), float("nan")), torch.zeros(2)), "NaN"),
        (torch.randn(4, 3), "single tensor"),
        (42, "must be an"),
        ([object()], "batch 0"),
    ],
)
def test_iter_batches_refuses_bad_data_with_a_clear_message(data, message):
    with pytest.raises((ValueError, TypeError), match=message):
        list(iter_batches(data, 4, where="t"))


def test_logits_are_found_in_tensors_tuples_dicts_and_model_outputs():
    t = torch.randn(2, 3)
    assert logits_of(t) is t
    assert logits_of((t, None)) is t
    assert logits_of({"logits": t, "loss": None}) is t
    assert logits_of(OrderedDict(scores=t), "scores") is t
    with pytest.raises(ValueError, match="no 'logits' entry; its entries are scores"):
        logits_of({"scores": t})
    with pytest.raises(ValueError, match="plain tensor"):
        logits_of(t, "logits")


def test_class_loss_is_cross_entropy_with_integer_targets():
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    b = as_batch((torch.zeros(6, 1), y), where="t")
    assert torch.allclose(default_loss(logits, b, where="t"), F.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="integer class indices"):
        default_loss(logits, as_batch((torch.zeros(6, 1), y.float()), where="t"), where="t")
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        default_loss(logits, as_batch((torch.zeros(6, 1), y + 4), where="t"), where="t")
    with pytest.raises(ValueError, match="no targets"):
        default_loss(logits, as_batch(torch.zeros(6, 1), where="t"), where="t")


def test_token_loss_predicts_the_next_token_by_hand():
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (2, 5))
    logits = torch.randn(2, 5, 7)
    by_hand = sum(-logits[n, t].log_softmax(-1)[ids[n, t + 1]] for n in range(2) for t in range(4)) / 8
    assert torch.allclose(default_loss(logits, as_batch(ids, where="t"), where="t"), by_hand)
    hf = as_batch({"input_ids": ids, "labels": ids}, where="t")  # HF labels: shifted the same way
    assert torch.allclose(default_loss(logits, hf, where="t"), by_hand)
    aligned = as_batch((ids, ids), where="t")  # explicit targets: aligned
    expected = F.cross_entropy(logits.reshape(-1, 7), ids.reshape(-1))
    assert torch.allclose(default_loss(logits, aligned, where="t"), expected)
    masked = ids.clone()
    masked[:, 3:] = IGNORE_INDEX
    got = default_loss(logits, as_batch({"input_ids": ids, "labels": masked}, where="t"), where="t")
    keep = sum(-logits[n, t].log_softmax(-1)[ids[n, t + 1]] for n in range(2) for t in range(2)) / 4
    assert torch.allclose(got, keep)


def test_user_loss_gets_targets_or_the_inputs():
    seen = []

    def loss_fn(output, targets):
        seen.append(targets)
        return output.sum()

    loss = make_loss(loss_fn, where="t")
    x, y = torch.randn(3, 2), torch.tensor([0, 1, 0])
    loss(torch.randn(3, 2), as_batch((x, y), where="t"))
    loss(torch.randn(3, 2), as_batch(x, where="t"))
    assert seen[0] is y and seen[1] is x
    with pytest.raises(TypeError, match="'loss_fn' parameter of t must be callable"):
        make_loss(3, where="t")


def test_plain_cross_entropy_on_a_model_output_uses_its_logits():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss = make_loss(nn.CrossEntropyLoss(), where="t")
    got = loss({"logits": logits}, as_batch((torch.zeros(4, 1), y), where="t"))
    assert torch.allclose(got, F.cross_entropy(logits, y))


def test_example_batch_and_repeat_keep_integer_inputs():
    ids = torch.randint(0, 50, (1, 8))
    b = example_batch(nn.Identity(), example_inputs={"input_ids": ids}, where="t")
    big = b.repeat_to(5)
    assert big.kwargs["input_ids"].shape == (5, 8) and big.kwargs["input_ids"].dtype == torch.long
    assert torch.equal(big.kwargs["input_ids"][4], ids[0])
    z = example_batch(nn.Identity(), (1, 4, 4), where="t")
    assert z.args[0].shape == (1, 1, 4, 4) and not z.args[0].any()
    with pytest.raises(ValueError, match="exactly one of 'input_shape'.*Got both"):
        example_batch(nn.Identity(), (3,), torch.zeros(1, 3), where="t")
    with pytest.raises(TypeError, match="'example_inputs' parameter of t must be a tensor"):
        example_batch(nn.Identity(), example_inputs=3, where="t")


def test_forward_batches_restores_training_flags_even_on_failure():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout())
    model.train()
    model[1].eval()
    out = forward_batches(model, [torch.randn(2, 3)])
    assert out.shape == (2, 2) and model.training and not model[1].training
    with pytest.raises(RuntimeError):
        forward_batches(model, [torch.randn(2, 5)])
    assert model.training and not model[1].training


def test_a_list_of_two_token_tensors_is_two_batches_and_a_tuple_is_a_pair():
    a, b = torch.randint(0, 9, (3, 5)), torch.randint(0, 9, (3, 5))
    as_list = list(iter_batches([a, b], 8, where="t"))
    assert len(as_list) == 2 and all(x.targets is None for x in as_list)
    as_tuple = list(iter_batches((a, b), 8, where="t"))
    assert len(as_tuple) == 1 and torch.equal(as_tuple[0].targets, b)


def test_a_single_tensor_as_calibration_data_is_refused_not_read_row_by_row():
    from prunelab.pruning import Pruner, prune

    x = torch.randint(0, 10, (8, 5))
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(TypeError, match="'data' parameter of Pruner is a single tensor"):
        Pruner(model, 0.5, criterion="wanda", calibration=x)
    with pytest.raises(TypeError, match="single tensor"):
        prune(model, 0.5, criterion="wanda", data=x)
    prune(model, 0.5, criterion="wanda", data=[x])  # one batch: fine
    assert float((model[1].weight == 0).float().mean()) == pytest.approx(0.5)
