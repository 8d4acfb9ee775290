"""fit/evaluate on every zoo model, with its batches in the model's own form (tests/zoo.py)."""

import math

import pytest
import torch
from zoo import BY_NAME, zoo_params

from prunelab.pruning import Pruner
from prunelab.training import evaluate, fit

TOKEN_MODELS = {"lstm-lm", "gru-lm", "hf-gpt2", "hf-llama"}


@pytest.mark.parametrize("zoo", zoo_params())
def test_a_few_steps_of_fit_lower_the_training_loss(zoo):
    model = zoo.build(0)
    batches = zoo.batches(3, seed=0, batch=8)
    before = evaluate(model, batches)
    history = fit(model, batches, epochs=4, optimizer="adam", lr=1e-2, progress=False)
    after = evaluate(model, batches)
    assert [h["step"] for h in history] == [3, 6, 9, 12]
    assert history[-1]["loss"] < history[0]["loss"]
    assert after["loss"] < before["loss"]
    for result in (before, after):
        assert math.isfinite(result["loss"]) and 0.0 <= result["accuracy"] <= 1.0 and result["n"] == 24
        if zoo.name in TOKEN_MODELS:  # next-token loss over 7 predicted positions of each sequence
            assert result["tokens"] == 24 * 7
            assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
        else:
            assert "perplexity" not in result


@pytest.mark.filterwarnings("ignore::prunelab.pruning.targets.TiedWeightSkipped")
@pytest.mark.parametrize("zoo", zoo_params(["lstm-lm", "hf-gpt2"]))
def test_an_agp_pruner_inside_fit_keeps_its_zeros(zoo):
    model = zoo.build(0)
    pruner = Pruner(
        model, 0.6, criterion="gradient", schedule="agp", schedule_args={"n_prunes": 3, "every": 2, "start": 2}
    )
    fit(model, zoo.batches(4, seed=1, batch=4), epochs=4, optimizer="adam", lr=1e-2, pruner=pruner, progress=False)
    assert pruner.done and len(pruner.history) == 4 and pruner.sparsity() == pytest.approx(0.6, abs=0.01)
    assert pruner.step_count == 16 > pruner.schedule.last_step  # trained on after the last prune
    for target in pruner.targets:
        pruned = pruner.mask(target.name) == 0
        assert pruned.any() and torch.all(target.weight[pruned] == 0), target.name
    assert math.isfinite(evaluate(model, zoo.batches(2, seed=2))["loss"])


def test_a_dataloader_of_hugging_face_dicts_trains_bert():
    zoo = BY_NAME["hf-bert"]
    examples = [{k: v[i] for k, v in batch.items()} for batch in zoo.batches(4, seed=0, batch=4) for i in range(4)]
    loader = torch.utils.data.DataLoader(examples, batch_size=4, shuffle=True)
    model = zoo.build(0)
    before = evaluate(model, loader)
    history = fit(model, loader, epochs=5, optimizer="adam", lr=1e-2, progress=False, val=loader)
    assert history[-1]["val_loss"] < before["loss"]
    assert evaluate(model, loader)["n"] == 16
