"""HashedNets layers: the hashing is xxHash32, the virtual matrix is the signed buckets, a
bucket's gradient is the signed sum of its members' gradients, and the counts agree."""

import struct

import numpy as np
import pytest
import torch
import xxhash

import prunelab
from prunelab.models import HashedConv2d, HashedLinear
from prunelab.models.hashed import xxh32_pairs


def by_hand(rows: int, cols: int, buckets: int, seed: int):
    """Bucket and sign of every (i, j), from the xxhash package one key at a time."""
    bucket = np.zeros((rows, cols), dtype=np.int64)
    sign = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            key = struct.pack("<II", i, j)
            bucket[i, j] = xxhash.xxh32_intdigest(key, seed) % buckets
            sign[i, j] = 1.0 if xxhash.xxh32_intdigest(key, seed + 1) % 2 == 0 else -1.0
    return torch.from_numpy(bucket), torch.from_numpy(sign).float()


def test_vectorised_xxh32_equals_the_xxhash_package():
    rng = np.random.default_rng(0)
    i = rng.integers(0, 2**32, size=300, dtype=np.uint64)
    j = rng.integers(0, 2**32, size=300, dtype=np.uint64)
    for seed in (0, 1, 12345, 2**32 - 2):
        ours = xxh32_pairs(i, j, seed)
        for a, b, h in zip(i, j, ours):
            assert int(h) == xxhash.xxh32_intdigest(struct.pack("<II", int(a), int(b)), seed)


@pytest.mark.parametrize("seed", [0, 7])
def test_the_virtual_matrix_is_the_buckets_gathered_with_signs(seed):
    layer = HashedLinear(5, 7, buckets=6, seed=seed)
    bucket, sign = by_hand(7, 5, 6, seed)
    expected = sign * layer.weight.detach()[bucket]
    assert torch.equal(layer.virtual_weight().detach(), expected)
    x = torch.randn(3, 5)
    assert torch.allclose(layer(x), x @ expected.T + layer.bias.detach())
    # every sign and (for 35 entries over 6 buckets) every bucket occurs
    assert set(sign.flatten().tolist()) == {-1.0, 1.0}
    assert set(bucket.flatten().tolist()) == set(range(6))


def test_a_buckets_gradient_is_the_signed_sum_of_its_members_gradients():
    torch.manual_seed(0)
    layer = HashedLinear(6, 4, buckets=5, seed=3)
    x, target = torch.randn(8, 6), torch.randn(8, 4)
    ((layer(x) - target) ** 2).sum().backward()
    # the same loss with the virtual matrix as a free dense tensor
    dense = layer.virtual_weight().detach().clone().requires_grad_(True)
    ((x @ dense.T + layer.bias.detach() - target) ** 2).sum().backward()
    bucket, sign = by_hand(4, 6, 5, 3)
    expected = torch.zeros(5).index_add_(0, bucket.flatten(), (sign * dense.grad).flatten())
    assert torch.allclose(layer.weight.grad, expected, atol=1e-5)


def test_conv_layer_hashes_output_channel_against_flat_input_entry():
    layer = HashedConv2d(3, 4, 3, stride=2, padding=1, compression=0.25, seed=11)
    assert layer.buckets == round(0.25 * 4 * 3 * 3 * 3) == 27
    bucket, sign = by_hand(4, 27, 27, 11)
    expected = (sign * layer.weight.detach()[bucket]).view(4, 3, 3, 3)
    assert torch.equal(layer.virtual_weight().detach(), expected)
    x = torch.randn(2, 3, 9, 9)
    reference = torch.nn.functional.conv2d(x, expected, layer.bias.detach(), stride=2, padding=1)
    assert torch.allclose(layer(x), reference, atol=1e-6)


def test_the_same_seed_gives_the_same_hashing_and_another_seed_another():
    a, b = HashedLinear(50, 20, compression=0.1, seed=5), HashedLinear(50, 20, compression=0.1, seed=5)
    c = HashedLinear(50, 20, compression=0.1, seed=6)
    assert torch.equal(a.index, b.index)
    assert not torch.equal(a.index, c.index)
    # the index is not saved: a saved layer is its buckets and bias
    assert set(a.state_dict()) == {"weight", "bias"}


def test_compression_factor_and_parameter_count_agree():
    model = prunelab.build_model("mlp", input_shape=(1, 28, 28), n_classes=10, hidden=[100], hashed=1 / 64, seed=0)
    k1, k2 = round(784 * 100 / 64), round(100 * 10 / 64)
    assert (model.fc1.buckets, model.fc2.buckets) == (k1, k2) == (1225, 16)
    assert model.fc1.compression == pytest.approx(k1 / 78400)
    total = prunelab.summary(model, (1, 28, 28)).total
    assert total.params == sum(p.numel() for p in model.parameters()) == k1 + 100 + k2 + 10
    assert total.bytes_dense == 4 * total.params
    # FLOPs are those of the virtual layers: hashing saves memory, not arithmetic
    dense = prunelab.summary(prunelab.build_model("mlp", hidden=[100]), (1, 28, 28)).total
    assert total.flops_dense == dense.flops_dense
    # a tiny factor still keeps one bucket per layer
    tiny = HashedLinear(10, 2, compression=1e-6)
    assert tiny.buckets == 1


def test_every_registry_model_takes_hashed_and_rebuilds_from_its_config():
    for name, shape in [
        ("mlp", (1, 28, 28)),
        ("lenet-300-100", (1, 28, 28)),
        ("lenet5", (1, 28, 28)),
        ("conv-pool-linear", (1, 28, 28)),
        ("small_conv", (1, 28, 28)),
        ("medium_conv", (1, 28, 28)),
        ("vgg11", (3, 32, 32)),
    ]:
        model = prunelab.build_model(name, input_shape=shape, n_classes=10, hashed=0.125, seed=2)
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        assert not layers, name
        again = prunelab.build_model(**model.config)
        x = torch.randn(2, *shape)
        model.eval(), again.eval()
        assert torch.equal(model(x), again(x)), name


def test_bad_compression_is_named():
    with pytest.raises(ValueError, match="'hashed' parameter of mlp"):
        prunelab.build_model("mlp", hashed=0.0)
    with pytest.raises(ValueError, match="'hashed' parameter of mlp"):
        prunelab.build_model("mlp", hashed=1.5)
    with pytest.raises(ValueError, match="exactly one of 'compression'"):
        HashedLinear(4, 4)
    with pytest.raises(ValueError, match="'buckets' parameter of HashedLinear"):
        HashedLinear(4, 4, buckets=17)


def test_a_hashed_mlp_learns_digits():
    ds = prunelab.load_dataset("digits")
    model = prunelab.build_model("mlp", dataset=ds, hidden=[64], hashed=0.25, seed=0)
    before = prunelab.evaluate(model, (ds.x_test, ds.y_test))["accuracy"]
    prunelab.fit(model, ds, epochs=8, lr=0.1, seed=0, progress=False)
    after = prunelab.evaluate(model, (ds.x_test, ds.y_test))["accuracy"]
    assert before < 0.3 and after > 0.85
