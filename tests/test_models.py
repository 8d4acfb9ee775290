"""Tests of prunelab.models: the registry, build_model and every registered model.

The generic tests are parametrised over the registry, so a newly registered
model is tested for free; the parameter counts are checked against arithmetic
written out by hand.
"""

from __future__ import annotations

import copy
import json
import pickle
from types import SimpleNamespace

import pytest
import torch
from helpers import LANGUAGE_MODELS
from torch import nn

from prunelab.models import MODELS, build_model, model_names, model_options

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]
STANDARD_LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.BatchNorm2d)
NAMES = [n for n in model_names() if n not in LANGUAGE_MODELS]  # image classifiers (LMs: test_lm_models.py)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_if_fits(name: str, shape: tuple[int, ...], **kwargs) -> nn.Module | None:
    """Build ``name`` for ``shape``, or None when the input is too small for the net's
    pooling, in which case the ValueError must name the model and the input shape."""
    try:
        return build_model(name, input_shape=shape, n_classes=10, **kwargs)
    except ValueError as error:
        message = str(error)
        assert f"'input_shape' parameter of {name}" in message and str(shape) in message, message
        return None


# --- the registry ------------------------------------------------------------------------------


def test_model_names_sorted_and_complete():
    expected = {"mlp", "lenet-300-100", "lenet5", "conv-pool-linear", "small_conv", "medium_conv", "vgg11"}
    assert expected <= set(NAMES)
    assert NAMES == sorted(NAMES)


@pytest.mark.parametrize(
    "alias, canonical",
    [("lenet_300_100", "lenet-300-100"), ("lenet-5", "lenet5"), ("conv_pool_linear", "conv-pool-linear")],
)
def test_alias_builds_canonical_model(alias, canonical):
    model = build_model(alias, seed=0)
    assert model.config["name"] == canonical
    reference = build_model(canonical, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_register_your_own_model(monkeypatch):
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))

    @MODELS.register("tiny-test-net")
    def tiny(input_shape, n_classes, *, width=4):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(torch.Size(input_shape).numel(), width), nn.ReLU(), nn.Linear(width, n_classes)
        )

    model = build_model("tiny-test-net", input_shape=(2, 3, 3), n_classes=5, width=6, seed=1)
    assert model(torch.zeros(4, 2, 3, 3)).shape == (4, 5)
    assert model.config == {"name": "tiny-test-net", "input_shape": [2, 3, 3], "n_classes": 5, "width": 6, "seed": 1}


def test_model_options_lists_defaults():
    assert model_options("mlp") == {"hidden": (100,)}
    assert model_options("conv_pool_linear") == {"kernel": 5, "channels": 8, "stride": 1, "pool": 2, "dropout": 0.0}
    assert model_options("lenet-300-100") == {}


# --- every registered model ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_builds_on_mnist_shape(name):
    model = build_model(name)
    assert model.config["input_shape"] == [1, 28, 28] and model.config["n_classes"] == 10
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward(name, shape):
    model = build_if_fits(name, shape, seed=0)
    if model is None:
        return
    x = torch.randn(3, *shape)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits.logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_n_classes_adapts(name):
    assert build_model(name, n_classes=3)(torch.randn(2, 1, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_only_standard_layers(name):
    model = build_model(name)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert leaves and all(isinstance(m, STANDARD_LAYERS) for m in leaves), leaves


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_through_json(name, shape):
    model = build_if_fits(name, shape, seed=3)
    if model is None:
        return
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    assert config["name"] == name and config["input_shape"] == list(shape) and config["n_classes"] == 10
    assert set(model_options(name)) <= set(config)
    rebuilt = build_model(**config)
    assert rebuilt.config == model.config
    for (key, a), (key_b, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert key == key_b and torch.equal(a, b), key


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights_other_seed_other_weights(name):
    a, b, c = (build_model(name, seed=s) for s in (7, 7, 8))
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert any(not torch.equal(sd_a[k], sd_c[k]) for k in sd_a)


@pytest.mark.parametrize("name", NAMES)
def test_seed_leaves_global_rng_alone(name):
    state = torch.get_rng_state()
    build_model(name, seed=0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_and_pickle(name):
    model = build_model(name, seed=0).eval()
    x = torch.randn(2, 1, 28, 28)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.config == model.config
        assert torch.equal(clone(x), expected)


# --- input shapes and the dataset ---------------------------------------------------------------


def test_dataset_gives_defaults_and_explicit_arguments_win():
    ds = SimpleNamespace(input_shape=(3, 32, 32), n_classes=100)
    assert build_model("lenet5", dataset=ds).config["input_shape"] == [3, 32, 32]
    assert build_model("lenet5", dataset=ds).config["n_classes"] == 100
    model = build_model("lenet5", dataset=ds, input_shape=(1, 28, 28), n_classes=10)
    assert model.config["input_shape"] == [1, 28, 28] and model.config["n_classes"] == 10
    assert n_params(model) == 431_080


def test_mlp_accepts_flat_inputs():
    model = build_model("mlp", input_shape=(784,), hidden=[30])
    assert n_params(model) == 23_860
    assert model(torch.randn(5, 784)).shape == (5, 10)
    image_model = build_model("mlp")
    assert image_model(torch.randn(5, 784)).shape == image_model(torch.randn(5, 1, 28, 28)).shape


def test_lenet5_too_small_raises_before_building():
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"lenet5.*conv2.*\(1, 8, 8\).*at least 16"):
        build_model("lenet5", input_shape=(1, 8, 8))
    assert torch.equal(state, torch.get_rng_state())  # no layer was initialised
    build_model("lenet5", input_shape=(1, 16, 16))


def test_small_conv_needs_8_pixels():
    with pytest.raises(ValueError, match=r"small_conv.*conv3_pool.*\(1, 7, 7\).*at least 8"):
        build_model("small_conv", input_shape=(1, 7, 7))


@pytest.mark.parametrize("name", ["lenet5", "conv-pool-linear", "small_conv", "medium_conv", "vgg11"])
def test_conv_models_refuse_flat_shapes(name):
    with pytest.raises(ValueError, match=rf"'input_shape' parameter of {name}.*\(784,\)"):
        build_model(name, input_shape=(784,))


@pytest.mark.parametrize(
    "shape, kept",
    [((3, 32, 32), [1, 2, 3, 4, 5]), ((1, 28, 28), [1, 2, 3, 4]), ((1, 8, 8), [1, 2, 3]), ((1, 1, 1), [])],
    ids=str,
)
def test_vgg11_skips_pools_that_would_empty_the_map(shape, kept):
    model = build_model("vgg11", input_shape=shape, width=0.125)
    assert model.kept_pools == kept
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == len(kept)
    assert model.classifier[0].in_features == 64  # 512 · 0.125 channels × 1 × 1
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_vgg11_width_and_batch_norm_options():
    model = build_model("vgg11", width=0.25, batch_norm=False)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 64, 128, 128, 128, 128]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_lenet5_conv_relu_option():
    plain, with_relu = build_model("lenet5"), build_model("lenet5", conv_relu=True)
    assert not hasattr(plain, "conv1_relu") and isinstance(with_relu.conv1_relu, nn.ReLU)
    assert n_params(plain) == n_params(with_relu) == 431_080


def test_readable_layer_names():
    assert [n for n, _ in build_model("lenet-300-100").named_children()] == [
        "flatten",
        "fc1",
        "fc1_relu",
        "fc2",
        "fc2_relu",
        "fc3",
    ]
    assert [n for n, _ in build_model("conv-pool-linear").named_children()] == [
        "conv1",
        "conv1_relu",
        "conv1_pool",
        "dropout",
        "flatten",
        "fc1",
    ]


# --- parameter counts, by hand -----------------------------------------------------------------

# Each entry: model, options, weights + biases of every layer written out (on 1×28×28, 10 classes).
# BatchNorm2d has 2 parameters per channel.
HAND_COUNTS = [
    # 784·100 + 100 + 100·10 + 10 = 79,510
    ("mlp", {"hidden": [100]}, 784 * 100 + 100 + 100 * 10 + 10),
    # 784·30 + 30 + 30·10 + 10 = 23,860
    ("mlp", {"hidden": [30]}, 784 * 30 + 30 + 30 * 10 + 10),
    # 266,610
    ("lenet-300-100", {}, 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10),
    # conv1 20·1·5·5+20; 28→24→pool 12; conv2 50·20·5·5+50; 12→8→pool 4; fc1 50·4·4·500+500; fc2 500·10+10
    ("lenet5", {}, (20 * 25 + 20) + (50 * 20 * 25 + 50) + (50 * 4 * 4 * 500 + 500) + (500 * 10 + 10)),
    # width 0.25: round(5), round(12.5) = 12 (half to even), round(125); fc1 sees 12·4·4
    ("lenet5", {"width": 0.25}, (5 * 25 + 5) + (12 * 5 * 25 + 12) + (12 * 4 * 4 * 125 + 125) + (125 * 10 + 10)),
    # width 0.001: every width rounds to 0 (20·0.001, 50·0.001, 500·0.001 = 0.5 to even) and is raised to 1
    ("lenet5", {"width": 0.001}, (1 * 25 + 1) + (1 * 1 * 25 + 1) + (1 * 4 * 4 * 1 + 1) + (1 * 10 + 10)),
    # conv 6·1·7·7+6; (28-7)//2+1 = 11; pool 3 → 11//3 = 3, so 3×3; linear 6·3·3·10+10 → 850
    ("conv-pool-linear", {"kernel": 7, "channels": 6, "stride": 2, "pool": 3}, (6 * 49 + 6) + (6 * 3 * 3 * 10 + 10)),
    # defaults: conv 8·25+8; 28-5+1 = 24; pool 2 → 12×12; linear 8·12·12·10+10 → 11,738
    ("conv-pool-linear", {}, (8 * 25 + 8) + (8 * 12 * 12 * 10 + 10)),
    # same padding: 28→14→7→3, flatten 128·3·3
    (
        "small_conv",
        {},
        (32 * 25 + 32)
        + (64 * 32 * 9 + 64)
        + (128 * 64 * 9 + 128)
        + (128 * 9 * 512 + 512)
        + (512 * 128 + 128)
        + (128 * 10 + 10),
    ),
    (
        "medium_conv",
        {},
        (64 * 25 + 64)
        + (128 * 64 * 9 + 128)
        + (256 * 128 * 9 + 256)
        + (256 * 9 * 1024 + 1024)
        + (1024 * 256 + 256)
        + (256 * 10 + 10),
    ),
    # convs (with bias) + BN (2 per channel) + classifier on 512·1·1 features (pools 1-4 kept)
    (
        "vgg11",
        {},
        (64 * 9 + 64)
        + (128 * 64 * 9 + 128)
        + (256 * 128 * 9 + 256)
        + (256 * 256 * 9 + 256)
        + (512 * 256 * 9 + 512)
        + 3 * (512 * 512 * 9 + 512)
        + 2 * (64 + 128 + 256 + 256 + 512 + 512 + 512 + 512)
        + (512 * 512 + 512)
        + (512 * 512 + 512)
        + (512 * 10 + 10),
    ),
]


@pytest.mark.parametrize(
    "name, options, expected", HAND_COUNTS, ids=[f"{name}{options or ''}" for name, options, _ in HAND_COUNTS]
)
def test_parameter_counts_on_mnist(name, options, expected):
    assert n_params(build_model(name, **options)) == expected


def test_published_counts():
    counts = {(name, json.dumps(options)): n for name, options, n in HAND_COUNTS}
    assert counts[("mlp", '{"hidden": [100]}')] == 79_510
    assert counts[("mlp", '{"hidden": [30]}')] == 23_860
    assert counts[("lenet-300-100", "{}")] == 266_610
    assert counts[("lenet5", "{}")] == 431_080


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_model_suggests_a_close_name():
    with pytest.raises(ValueError, match=r"unknown model 'lenet'.*did you mean 'lenet5'.*mlp"):
        build_model("lenet")
    with pytest.raises(TypeError, match="'name' parameter of build_model"):
        build_model(3)


def test_unknown_option_names_it_and_lists_valid_ones():
    with pytest.raises(TypeError, match=r"'hiden' for model mlp \(did you mean 'hidden'\?\); mlp accepts: hidden"):
        build_model("mlp", hiden=[10])
    with pytest.raises(TypeError, match="'hidden' for model lenet-300-100; lenet-300-100 accepts no options"):
        build_model("lenet-300-100", hidden=[10])


@pytest.mark.parametrize(
    "name, options, error, pattern",
    [
        ("mlp", {"hidden": [0]}, ValueError, r"'hidden' parameter of mlp .*Got \[0\]"),
        ("mlp", {"hidden": [100, -3]}, ValueError, r"'hidden' parameter of mlp .*Got \[100, -3\]"),
        ("mlp", {"hidden": "100"}, TypeError, r"'hidden' parameter of mlp .*Got '100' of type str"),
        ("mlp", {"hidden": [1.5]}, TypeError, r"'hidden' parameter of mlp"),
        (
            "conv-pool-linear",
            {"kernel": 30},
            ValueError,
            r"'kernel' parameter of conv-pool-linear must be at most 28 .*\(1, 28, 28\).*Got 30",
        ),
        ("conv-pool-linear", {"kernel": 0}, ValueError, r"'kernel' parameter .*Got 0"),
        ("conv-pool-linear", {"channels": 2.5}, TypeError, r"'channels' parameter .*Got 2.5"),
        ("conv-pool-linear", {"stride": 0}, ValueError, r"'stride' parameter .*Got 0"),
        (
            "conv-pool-linear",
            {"pool": 25},
            ValueError,
            r"'pool' parameter of conv-pool-linear must be at most 24 .*Got 25",
        ),
        (
            "conv-pool-linear",
            {"dropout": 1.5},
            ValueError,
            r"'dropout' parameter of conv-pool-linear must be a float in \[0, 1\)\. Got 1.5",
        ),
        ("conv-pool-linear", {"dropout": -0.1}, ValueError, r"'dropout' parameter .*Got -0.1"),
        ("lenet5", {"conv_relu": "yes"}, TypeError, r"'conv_relu' parameter of lenet5 .*Got 'yes'"),
        ("vgg11", {"width": 0}, ValueError, r"'width' parameter of vgg11 .*Got 0"),
        ("lenet5", {"width": -0.5}, ValueError, r"'width' parameter of lenet5 .*Got -0.5"),
        ("vgg11", {"batch_norm": 1}, TypeError, r"'batch_norm' parameter of vgg11"),
        ("mlp", {"input_shape": (0, 28, 28)}, ValueError, r"'input_shape' parameter of mlp .*Got \(0, 28, 28\)"),
        ("mlp", {"input_shape": (28, 28)}, ValueError, r"'input_shape' parameter of mlp .*Got \(28, 28\)"),
        ("mlp", {"input_shape": "1x28x28"}, TypeError, r"'input_shape' parameter of mlp"),
        ("mlp", {"n_classes": 0}, ValueError, r"'n_classes' parameter of mlp .*Got 0"),
        ("mlp", {"seed": -1}, ValueError, r"'seed' parameter of mlp .*Got -1"),
        ("mlp", {"seed": "0"}, TypeError, r"'seed' parameter of mlp"),
        ("mlp", {"dataset": object()}, TypeError, r"'dataset' parameter of build_model"),
    ],
)
def test_bad_values_are_named(name, options, error, pattern):
    with pytest.raises(error, match=pattern):
        build_model(name, **options)
