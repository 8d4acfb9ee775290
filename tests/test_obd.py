"""Optimal Brain Damage: the GGN diagonal against brute-force second derivatives.

The reference: for every sample, the Jacobian J of the logits with respect to all
weights (``torch.autograd.functional.jacobian``) and ``diag(Jᵀ H J)`` with
``H = diag(p) − p pᵀ``, averaged; and on the last layer, where the logits are linear
in the weights, the true Hessian diagonal of the loss by double backward.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import prunelab
from prunelab.pruning import OBD, Pruner, make_criterion, prune
from prunelab.pruning import obd as obd_module
from prunelab.pruning.targets import resolve_targets


# ----------------------------------------------------------------- models
def mlp():
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3))


def strided_cnn():  # 7×7 → 7×7 → stride 2, dilation 2, padding 1 → 4×4
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 2, stride=2, dilation=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(32, 3),
    )


def padded_cnn():  # 'same' padding, circular and asymmetric (kernel 2×3)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding="same", padding_mode="circular"),
        nn.Tanh(),
        nn.Conv2d(2, 2, (2, 3), padding="same"),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(50, 3),
    )


def sequence_mlp():  # a Linear on (N, 3, 4): its weight is shared over 3 positions
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 3))


MODELS = {
    "mlp": (mlp, (5,)),
    "cnn": (cnn, (1, 6, 6)),
    "strided_cnn": (strided_cnn, (1, 7, 7)),
    "padded_cnn": (padded_cnn, (1, 5, 5)),
    "sequence_mlp": (sequence_mlp, (3, 4)),
}


def make(name, seed=0, n=7, dtype=torch.float64):
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(dtype)
    x = torch.randn(n, *shape, dtype=dtype)
    y = torch.randint(0, 3, (n,))
    return model, x, y


# -------------------------------------------------------------- reference
def per_sample_jacobians(model, x, targets):
    """[(p_n, [J_n per target, (C, numel)])] from autograd.functional.jacobian, model in eval."""
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    names = [t.name for t in targets]
    out = []
    for n in range(len(x)):

        def logits(*ws, n=n):
            return functional_call(model, {**params, **dict(zip(names, ws))}, (x[n : n + 1],))[0]

        jac = torch.autograd.functional.jacobian(logits, tuple(params[k] for k in names))
        p = logits(*(params[k] for k in names)).softmax(0)
        out.append((p, [j.reshape(len(p), -1) for j in jac]))
    return out


def brute_ggn_diagonal(model, x, targets):
    """(1/N) Σ_n diag(J_nᵀ (diag p_n − p_n p_nᵀ) J_n), per target."""
    total = [torch.zeros(t.weight.numel(), dtype=torch.float64) for t in targets]
    for p, jacobians in per_sample_jacobians(model, x, targets):
        h = torch.diag(p) - torch.outer(p, p)
        for acc, j in zip(total, jacobians):
            acc += torch.einsum("ip,ij,jp->p", j, h, j)
    return [(acc / len(x)).reshape(t.weight.shape) for acc, t in zip(total, targets)]


def calibrated(model, x, y, batches=None, **options):
    criterion = OBD(**options)
    targets = resolve_targets(model)
    criterion.calibrate(model, targets, batches or [(x, y)], F.cross_entropy)
    return criterion, targets


# ------------------------------------------------------------- the maths
def test_factorisation_of_the_softmax_cross_entropy_hessian():
    torch.manual_seed(0)
    for n_classes in (2, 3, 10):
        p = torch.rand(n_classes, dtype=torch.float64).softmax(0)
        a = torch.diag(p.sqrt()) - torch.outer(p, p.sqrt())  # A = diag(√p) − p √pᵀ
        assert torch.allclose(a @ a.T, torch.diag(p) - torch.outer(p, p), rtol=0, atol=1e-15)
        logits = torch.randn(n_classes, dtype=torch.float64)  # and it is ∂²CE/∂f²
        label = torch.tensor([1])
        hess = torch.autograd.functional.hessian(lambda f: F.cross_entropy(f[None], label), logits)
        q = logits.softmax(0)
        assert torch.allclose(hess, torch.diag(q) - torch.outer(q, q), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # the point of that case
def test_exact_mode_equals_brute_force_ggn_diagonal(name):
    model, x, y = make(name)
    criterion, targets = calibrated(model, x, y)
    expected = brute_ggn_diagonal(model, x, targets)
    for got, want, t in zip(criterion.hessian_diagonal(), expected, targets):
        assert got.shape == t.weight.shape
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-14, msg=t.name)
    for score, h, t in zip(criterion.scores(targets), expected, targets):
        torch.testing.assert_close(score, 0.5 * h * t.weight.detach() ** 2, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp", "cnn", "strided_cnn"])
def test_last_layer_equals_the_true_hessian_diagonal(name):
    # the logits are linear in the last layer's weights, so there GGN = Hessian
    model, x, y = make(name)
    criterion, targets = calibrated(model, x, y)
    last = targets[-1].weight
    grad = torch.autograd.grad(F.cross_entropy(model(x), y), last, create_graph=True)[0].flatten()
    hess = torch.stack(
        [torch.autograd.grad(grad[i], last, retain_graph=True)[0].flatten()[i] for i in range(last.numel())]
    ).reshape(last.shape)
    torch.testing.assert_close(criterion.hessian_diagonal()[-1], hess, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("name", ["mlp", "cnn", "sequence_mlp"])
def test_batches_of_different_sizes_weigh_like_one_batch(name):
    model, x, y = make(name, n=9)
    whole, _ = calibrated(model, x, y)
    split, targets = calibrated(model, x, y, batches=[(x[:2], y[:2]), (x[2:7], y[2:7]), (x[7:], y[7:])])
    assert split.n_samples == 9
    for a, b in zip(split.hessian_diagonal(), whole.hessian_diagonal()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-16)
    # two calls to calibrate accumulate the same way
    twice = OBD()
    twice.calibrate(model, targets, [(x[:4], y[:4])], F.cross_entropy)
    twice.calibrate(model, targets, [(x[4:], y[4:])], F.cross_entropy)
    for a, b in zip(twice.hessian_diagonal(), whole.hessian_diagonal()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("name", ["cnn", "sequence_mlp", "padded_cnn"])
def test_chunked_computation_gives_the_same_diagonal(name, monkeypatch):
    model, x, y = make(name)
    reference, _ = calibrated(model, x, y)
    monkeypatch.setattr(obd_module, "_CHUNK_BYTES", 1)  # one sample and one class at a time
    monkeypatch.setattr(obd_module, "_DELTA_BYTES", 1)  # one backward per class
    chunked, _ = calibrated(model, x, y)
    for a, b in zip(chunked.hessian_diagonal(), reference.hessian_diagonal()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_mc_mode_is_an_unbiased_estimate_within_five_standard_errors(name):
    # The single-draw estimate for sample n is v_{n,y} = (J_nᵀ (p_n − e_y))², y ~ p_n: its
    # mean and variance are known exactly, so the tolerance is computed, not guessed.
    samples = 2000
    model, x, y = make(name)
    criterion, targets = calibrated(model, x, y, mode="mc", samples=samples, seed=1)
    n = len(x)
    means = [torch.zeros(t.weight.numel(), dtype=torch.float64) for t in targets]
    variances = [torch.zeros_like(m) for m in means]
    for p, jacobians in per_sample_jacobians(model, x, targets):
        residuals = p[None, :] - torch.eye(len(p), dtype=p.dtype)  # row y: p − e_y
        for mean, var, j in zip(means, variances, jacobians):
            v = (residuals @ j) ** 2  # (C, numel)
            m = p @ v
            mean += m / n
            var += (p @ v**2 - m**2) / (n**2 * samples)
    for got, mean, var, t in zip(criterion.hessian_diagonal(), means, variances, targets):
        got = got.flatten()
        assert torch.all((got - mean).abs() <= 5 * var.sqrt() + 1e-14), t.name
        assert (got - mean).norm() / mean.norm() < 0.05  # observed: 0.005–0.02


def test_mc_mode_is_seeded():
    model, x, y = make("mlp")
    a, _ = calibrated(model, x, y, mode="mc", samples=3, seed=5)
    b, _ = calibrated(model, x, y, mode="mc", samples=3, seed=5)
    c, _ = calibrated(model, x, y, mode="mc", samples=3, seed=6)
    assert all(torch.equal(u, v) for u, v in zip(a.hessian_diagonal(), b.hessian_diagonal()))
    assert not all(torch.equal(u, v) for u, v in zip(a.hessian_diagonal(), c.hessian_diagonal()))


# ------------------------------------------------------------- pruning
def brute_scores(model, x):
    targets = resolve_targets(model)
    return [0.5 * h * t.weight.detach() ** 2 for h, t in zip(brute_ggn_diagonal(model, x, targets), targets)]


def assert_lowest_pruned(scores, pruned):
    """Every pruned score is at most every kept score."""
    scores, pruned = torch.cat([s.flatten() for s in scores]), torch.cat([p.flatten() for p in pruned])
    assert 0 < int(pruned.sum()) < len(pruned)
    assert scores[pruned].max() <= scores[~pruned].min() * (1 + 1e-6)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_prune_with_obd_removes_the_lowest_half_h_w2(scope):
    model, x, y = make("mlp", n=20)
    expected = brute_scores(model, x)
    prunelab.prune(model, 0.5, criterion="obd", data=(x, y), scope=scope)
    pruned = [m.weight == 0 for m in (model[0], model[2])]
    assert sum(int(p.sum()) for p in pruned) == 16
    if scope == "local":
        for s, p in zip(expected, pruned):
            assert_lowest_pruned([s], [p])
    else:
        assert_lowest_pruned(expected, pruned)


def test_filter_granularity_on_a_conv_net_prunes_the_lowest_filters():
    model, x, y = make("strided_cnn", n=10)
    expected = brute_scores(model, x)
    prune(model, 0.5, criterion="obd", granularity="filter", data=(x, y), batch_size=4)
    convs = [model[0], model[2]]
    for conv, score in zip(convs, expected[:2]):
        dead = conv.weight.flatten(1).abs().sum(1) == 0
        assert int(dead.sum()) == 1
        group = score.flatten(1).norm(dim=1)  # the default l2 reduction
        assert group[dead].max() <= group[~dead].min()


def test_mc_mode_through_the_pruner_options():
    model, x, y = make("cnn", dtype=torch.float32)
    pruner = prune(model, 0.5, criterion={"name": "obd", "mode": "mc", "samples": 4}, data=(x, y))
    assert repr(pruner.criterion) == "OBD(mode='mc', samples=4, seed=0)"
    assert abs(pruner.sparsity() - 0.5) < 0.05


def test_iterative_pruner_recomputes_the_hessian_before_every_prune():
    model, x, y = make("mlp", n=12)
    calls = []

    class Spy(OBD):
        def calibrate(self, *args, **kwargs):
            calls.append(1)
            return super().calibrate(*args, **kwargs)

        def scores(self, targets):
            assert self.n_samples == len(x)  # reset in between: one pass each
            for got, want in zip(self.hessian_diagonal(), brute_ggn_diagonal(model, x, targets)):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-14)
            return super().scores(targets)

    pruner = Pruner(
        model,
        0.75,
        criterion=Spy(),
        schedule="iterative",
        schedule_args={"n_prunes": 3, "every": 2},
        calibration=(x, y),
        calibration_batch_size=5,
    )
    while not pruner.done:
        pruner.step()
    assert len(calls) == 3
    assert abs(pruner.sparsity() - 0.75) < 0.05


# ------------------------------------------------------------ bad input
def test_scoring_without_calibration_is_a_clear_error():
    model = mlp()
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(model, 0.5, criterion="obd")
    with pytest.raises(ValueError, match="pass calibration data"):
        OBD().scores(resolve_targets(model))
    with pytest.raises(ValueError, match="pass calibration data"):
        Pruner(model, 0.5, criterion="obd").update()


def test_a_target_the_output_does_not_use_is_named():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.lstm = nn.LSTM(3, 3)

        def forward(self, x):
            return self.fc(x)

    data = (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"does not depend on 'lstm.weight_ih_l0'"):
        prune(Unused(), 0.5, criterion="obd", data=data, layers=["fc", "lstm"])


@pytest.mark.parametrize(
    "loss_fn",
    [
        F.mse_loss,
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(reduction="sum"),
        lambda out, y: F.cross_entropy(out, y),
    ],
)
def test_losses_other_than_cross_entropy_are_refused(loss_fn):
    model, x, y = make("mlp")
    with pytest.raises(ValueError, match="cross-entropy"):
        prune(model, 0.5, criterion="obd", data=(x, y), loss_fn=loss_fn)


def test_cross_entropy_loss_module_with_defaults_is_accepted():
    model, x, y = make("mlp")
    reference, targets = calibrated(model, x, y)
    criterion = OBD()
    criterion.calibrate(model, targets, [(x, y)], nn.CrossEntropyLoss())
    assert all(torch.equal(a, b) for a, b in zip(criterion.hessian_diagonal(), reference.hessian_diagonal()))


def test_a_layer_run_twice_takes_the_per_sample_route_and_stays_exact():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    torch.manual_seed(0)
    model = Twice().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    targets = resolve_targets(model, ["fc"])
    criterion = OBD()
    criterion.calibrate(model, targets, [x], None)
    torch.testing.assert_close(criterion.hessian_diagonal()[0], brute_ggn_diagonal(model, x, targets)[0])
    with pytest.raises(ValueError, match="does not depend on 'unused.weight'"):
        prune(Twice(), 0.5, criterion="obd", data=(x.float(), torch.zeros(5, dtype=torch.long)), layers=["unused"])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="'mode' parameter of obd criterion must be one of: exact, mc"):
        OBD(mode="newton")
    with pytest.raises(ValueError, match="'samples' parameter"):
        OBD(mode="mc", samples=0)
    with pytest.raises(ValueError, match="applies to mode 'mc' only"):
        OBD(samples=4)
    assert isinstance(make_criterion("obd"), OBD)
    assert repr(make_criterion("obd")) == "OBD(mode='exact')"


def test_calibrate_restores_modes_weights_and_grads():
    model, x, y = make("cnn")
    model.train()
    model[2].eval()  # a mixed state is restored as it was
    modes = [m.training for m in model.modules()]
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # works under no_grad, like the Pruner's
        calibrated(model, x, y)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    for p in model.parameters():
        p.grad = None
    calibrated(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert not model._forward_hooks and not model[0]._forward_hooks


def test_frozen_weights_are_still_scored():
    model, x, y = make("mlp")
    reference, _ = calibrated(model, x, y)
    for p in model.parameters():
        p.requires_grad_(False)
    frozen, _ = calibrated(model, x, y)
    for a, b in zip(frozen.hessian_diagonal(), reference.hessian_diagonal()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-16)


def test_non_finite_logits_are_refused():
    model, x, y = make("mlp")
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        prune(model, 0.5, criterion="obd", data=(x, y))


# ------------------------------------- every target kind, class and token logits
def brute_ggn_general(model, batches, names):
    """(1/M) Σ over counted outputs (n, t) of diag(J_{n,t}ᵀ (diag p − p pᵀ) J_{n,t}), with J from
    ``jacobian`` of the sample's own forward; ``batches``: [(inputs, counted (N,) or (N, T))]."""
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    shapes = [params[k].shape for k in names]
    total = [torch.zeros(s.numel(), dtype=torch.float64) for s in shapes]
    count = 0
    for x, counted in batches:
        for n in range(len(x)):

            def logits(*ws, n=n):
                out = functional_call(model, {**params, **dict(zip(names, ws))}, (x[n : n + 1],))
                return out[0].reshape(-1, out.shape[-1])  # (positions, classes)

            jac = torch.autograd.functional.jacobian(logits, tuple(params[k] for k in names))
            p = logits(*(params[k] for k in names)).softmax(-1)
            for pos in torch.nonzero(counted[n].reshape(-1)).flatten().tolist():
                h = torch.diag(p[pos]) - torch.outer(p[pos], p[pos])
                count += 1
                for acc, j in zip(total, jac):
                    j = j[pos].reshape(p.shape[1], -1)
                    acc += torch.einsum("ip,ij,jp->p", j, h, j)
    return [(acc / count).reshape(s) for acc, s in zip(total, shapes)]


class TokenLM(nn.Module):
    """Embedding, a Linear over positions, a causal mix of positions and a decoder: (N, T, V)."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.hidden = nn.Linear(d, d)
        self.decoder = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = torch.tanh(self.hidden(self.embed(tokens)))
        return self.decoder(h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None])


class AttentionNet(nn.Module):
    def __init__(self, vocab=7, d=4, n_classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, n_classes)

    def forward(self, tokens):
        e = self.embed(tokens)
        return self.head(self.attn(e, e, e, need_weights=False)[0].mean(1))


class RecurrentNet(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.rnn = cell(3, 3, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Conv1D(nn.Module):
    """Hugging Face's Conv1D as GPT-2 uses it: weight (in, out), z = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def _tokens(n=4, t=5, vocab=7, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _obd_diagonal(model, names, batches, **options):
    criterion = OBD(**options)
    targets = resolve_targets(model, names)
    criterion.calibrate(model, targets, batches, None)
    return criterion, targets


def _next_token(tokens):
    counted = torch.ones_like(tokens, dtype=torch.bool)
    counted[:, -1] = False
    return counted


def test_token_logits_next_token_sum_over_counted_positions_equals_brute_force():
    torch.manual_seed(0)
    model = TokenLM().double()
    tokens = _tokens()
    names = ["embed.weight", "hidden.weight", "decoder.weight"]
    criterion, targets = _obd_diagonal(model, names, [tokens[:3], tokens[3:]])
    assert criterion.n_samples == 4 * 4  # positions counted: the last predicts nothing
    want = brute_ggn_general(model, [(tokens, _next_token(tokens))], names)
    for got, ref in zip(criterion.hessian_diagonal(), want):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)


def test_token_targets_with_ignore_index_and_hf_labels_drop_their_positions():
    torch.manual_seed(0)
    model = TokenLM().double()
    tokens = _tokens()
    targets = tokens.clone()
    targets[0, 1:3] = -100
    targets[2, 4] = -100
    names = ["hidden.weight", "decoder.weight"]
    aligned, _ = _obd_diagonal(model, names, [(tokens, targets)])
    want = brute_ggn_general(model, [(tokens, targets != -100)], names)
    for got, ref in zip(aligned.hessian_diagonal(), want):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)

    class Keyword(TokenLM):
        def forward(self, input_ids, attention_mask=None):
            return {"logits": super().forward(input_ids)}

    keyword = Keyword().double()
    keyword.load_state_dict(model.state_dict())
    hf, _ = _obd_diagonal(keyword, names, [{"input_ids": tokens, "labels": targets}])
    shifted = torch.zeros_like(tokens, dtype=torch.bool)
    shifted[:, :-1] = targets[:, 1:] != -100  # HF labels: position t predicts label t+1
    want = brute_ggn_general(model, [(tokens, shifted)], names)
    assert hf.n_samples == int(shifted.sum())
    for got, ref in zip(hf.hessian_diagonal(), want):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)


def test_multihead_attention_in_proj_and_out_proj_equal_brute_force():
    torch.manual_seed(0)
    model = AttentionNet().double()
    tokens = _tokens()
    names = ["attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    criterion, _ = _obd_diagonal(model, names, [tokens])
    want = brute_ggn_general(model, [(tokens, torch.ones(4, dtype=torch.bool))], names)
    for got, ref in zip(criterion.hessian_diagonal(), want):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_recurrent_weights_equal_brute_force(cell):
    torch.manual_seed(0)
    model = RecurrentNet(cell).double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    names = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"]
    criterion, _ = _obd_diagonal(model, names, [x])
    want = brute_ggn_general(model, [(x, torch.ones(3, dtype=torch.bool))], names)
    for got, ref in zip(criterion.hessian_diagonal(), want):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize(
    "name", ["grouped", "depthwise", "conv1d", "conv3d", "hf-conv1d", "padded-grouped", "padded-conv1d"]
)
def test_grouped_convs_other_convs_and_hf_conv1d_equal_brute_force(name):
    torch.manual_seed(0)
    if name == "padded-grouped":  # strided, dilated, circular 'same'-style padding, depthwise multiplier 2
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, dilation=2, padding=2, groups=2, padding_mode="circular"),
            nn.Tanh(),
            nn.Conv2d(4, 4, (2, 3), padding="same", groups=4),
            nn.Flatten(),
            nn.Linear(36, 3),
        )
        x = torch.randn(4, 2, 5, 5)
    elif name == "padded-conv1d":
        model = nn.Sequential(
            nn.Conv1d(2, 4, 4, padding="same", padding_mode="reflect", groups=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(24, 3),
        )
        x = torch.randn(4, 2, 6)
    elif name == "hf-conv1d":
        model, x = nn.Sequential(Conv1D(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)), torch.randn(4, 2, 3)
    elif name == "conv1d":
        model, x = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)), torch.randn(4, 2, 5)
    elif name == "conv3d":
        model, x = (
            nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)),
            torch.randn(4, 1, 3, 3, 3),
        )
    else:
        groups, cout = (2, 4) if name == "grouped" else (4, 8)
        model = nn.Sequential(nn.Conv2d(4, cout, 2, groups=groups), nn.Tanh(), nn.Flatten(), nn.Linear(cout * 4, 3))
        x = torch.randn(4, 4, 3, 3)
    model, x = model.double(), x.double()
    names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    criterion, targets = _obd_diagonal(model, names, [x])
    routes = obd_module._fast_routes(model, targets)
    assert routes[0] == ("transposed" if name == "hf-conv1d" else "conv")
    want = brute_ggn_general(model, [(x, torch.ones(4, dtype=torch.bool))], names)
    for got, ref in zip(criterion.hessian_diagonal(), want):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)


def test_tied_embedding_and_decoder_are_scored_once_with_both_uses():
    torch.manual_seed(0)
    model = TokenLM(vocab=7, d=4).double()
    model.decoder.weight = model.embed.weight  # (7, 4) both: tied as GPT-2's lm_head
    tokens = _tokens()
    criterion, targets = _obd_diagonal(model, ["decoder", "embed"], [tokens])
    assert [t.name for t in targets] == ["embed.weight"]
    want = brute_ggn_general(model, [(tokens, _next_token(tokens))], ["embed.weight"])
    torch.testing.assert_close(criterion.hessian_diagonal()[0], want[0], rtol=1e-9, atol=1e-14)


def test_mc_mode_on_token_logits_is_unbiased_within_five_standard_errors():
    torch.manual_seed(0)
    model = TokenLM().double()
    tokens = _tokens()
    names = ["hidden.weight", "decoder.weight"]
    exact, _ = _obd_diagonal(model, names, [tokens])
    draws = 400
    estimates = [
        torch.cat([h.flatten() for h in _obd_diagonal(model, names, [tokens], mode="mc", seed=s)[0].hessian_diagonal()])
        for s in range(draws)
    ]
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / draws**0.5
    want = torch.cat([h.flatten() for h in exact.hessian_diagonal()])
    assert torch.all((mean - want).abs() <= 5 * se + 1e-12)


def test_exact_mode_refuses_a_large_vocabulary_and_suggests_mc(monkeypatch):
    monkeypatch.setattr(obd_module, "MAX_EXACT_CLASSES", 6)
    torch.manual_seed(0)
    model = TokenLM(vocab=7)
    with pytest.raises(ValueError, match=r"7 classes, over the bound of 6.*mode='mc'"):
        prune(model, 0.5, criterion="obd", data=[_tokens()])
    pruner = prune(model, 0.5, criterion={"name": "obd", "mode": "mc"}, data=[_tokens()])
    assert abs(pruner.sparsity() - 0.5) < 0.05


def test_output_key_and_model_outputs_reach_obd():
    torch.manual_seed(0)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return {"logits": self.a(x), "aux": self.b(x)}

    x = torch.randn(6, 4)
    pruner = prune(TwoHeads(), 0.5, criterion="obd", data=[x], layers=["b"], output_key="aux")
    assert abs(pruner.sparsity() - 0.5) < 1e-9
    with pytest.raises(ValueError, match="does not depend on 'b.weight'"):
        prune(TwoHeads(), 0.5, criterion="obd", data=[x], layers=["b"])
