"""kappa (PROTOCOLS 5) against a brute-force reference: explicit loops over samples and logits
with torch.autograd.grad, kernel built in float64, BatchNorm statistics computed by hand."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn

from nasrisk.trials.metrics.ntk import condition_number, kappa, kappa_scores, te_nas_score
from nasrisk.trials.metrics.ntk_kernel import freeze_batch_stats
from nasrisk.trials.registry import METRICS

C = 4


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny ops: with the 2 cores shared, intra-op threads only spin (a 20x slowdown measured)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_classifier(num_classes: int = C) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
        nn.Tanh(),
        nn.Linear(6, num_classes),
    )


class TinyGenerator(nn.Module):
    """x -> x + mask (mark - x) with BatchNorm inside, like the trigger generator."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3))
        self.mask = nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mark = torch.tanh(self.body(x)) / 2 + 0.5
        mask = torch.sigmoid(self.mask(x))
        return x + mask * (mark - x)


def _randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial running stats and affine params, so a test sees if anything touches them."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)


@pytest.fixture
def nets():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    f, g = tiny_classifier(), TinyGenerator()
    _randomise_bn(f, gen)
    _randomise_bn(g, gen)
    x = torch.rand(6, 3, 8, 8, generator=gen)
    return f, g, x


def _batch_stat_bn(bn: nn.Module, inp: torch.Tensor, detach: bool) -> torch.Tensor:
    dims = [0] + list(range(2, inp.dim()))
    mean = inp.mean(dims, keepdim=True)
    var = inp.var(dims, unbiased=False, keepdim=True)
    if detach:
        mean, var = mean.detach(), var.detach()
    shape = [1, -1] + [1] * (inp.dim() - 2)
    return (inp - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def brute_kernel(f, x, *, generator=None, which, bn_mode):
    """K = mean_n J_n J_n^T by a loop over samples and logits. Every BN normalises with the
    batch's biased statistics computed here by hand; ``fixed-stats`` detaches them."""
    f, g = copy.deepcopy(f), copy.deepcopy(generator)
    for mod in (f, g):
        if mod is None:
            continue
        for m in mod.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = types.MethodType(
                    lambda self, inp: _batch_stat_bn(self, inp, bn_mode == "fixed-stats"), m
                )
    if which == "generator":
        params = list(g.parameters())
    else:  # conv/linear weight+bias, BN gamma
        params = [
            p
            for m in f.modules()
            for name, p in m.named_parameters(recurse=False)
            if not (isinstance(m, nn.modules.batchnorm._BatchNorm) and name == "bias")
        ]
    out = f(g(x) if g is not None else x)
    n, c = out.shape
    k = torch.zeros(c, c, dtype=torch.float64)
    for i in range(n):
        rows = []
        for j in range(c):
            grads = torch.autograd.grad(out[i, j], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                        for gr, p in zip(grads, params, strict=True)
                    ]
                ).double()
            )
        jn = torch.stack(rows)
        k += jn @ jn.T
    return k / n


def brute_kappa(k: torch.Tensor) -> float:
    e = torch.linalg.eigvalsh(k)
    return float(e[-1] / e[0])


@pytest.mark.parametrize("bn_mode", ["fixed-stats", "coupled"])
@pytest.mark.parametrize("variant", ["generator", "arch", "bare"])
def test_kappa_matches_brute_force(nets, bn_mode, variant):
    f, g, x = nets
    gen = None if variant == "bare" else g
    which = "generator" if variant == "generator" else "arch"
    res = kappa(f, x, generator=gen, params=which, bn_mode=bn_mode)
    ref = brute_kernel(f, x, generator=gen, which=which, bn_mode=bn_mode)
    eig = torch.linalg.eigvalsh(ref)
    assert not res.flagged
    assert res.kappa == pytest.approx(brute_kappa(ref), rel=1e-4)
    assert res.lambda_max == pytest.approx(float(eig[-1]), rel=1e-4)
    assert res.eigenvalues == pytest.approx(eig.tolist(), rel=1e-4)


def test_bn_modes_differ(nets):
    # The brute-force match above would be vacuous if the two modes gave the same kernel.
    f, g, x = nets
    a = kappa(f, x, generator=g, params="arch", bn_mode="fixed-stats").kappa
    b = kappa(f, x, generator=g, params="arch", bn_mode="coupled").kappa
    assert abs(a - b) / a > 1e-3


def test_chunking_does_not_change_kernel(nets):
    f, g, x = nets
    for mode in ("fixed-stats", "coupled"):
        whole = kappa(f, x, generator=g, params="all", bn_mode=mode)
        chunked = kappa(f, x, generator=g, params="all", bn_mode=mode, chunk_size=4)
        assert chunked.eigenvalues == pytest.approx(whole.eigenvalues, rel=1e-5)


def test_frozen_stats_equal_train_mode_output(nets):
    # running_var is unbiased, train-mode BN normalises with the biased variance: the frozen
    # copy corrects for it. BatchNorm1d sees 6 values per channel, so a missing (n-1)/n
    # correction would be visible far above the tolerance.
    f, g, x = nets
    model = nn.Sequential(g, f)
    frozen = freeze_batch_stats(model, x)
    train_out = copy.deepcopy(model).train()(x)
    assert not frozen.training
    torch.testing.assert_close(frozen(x), train_out, rtol=1e-5, atol=1e-6)
    # per sample, the frozen copy gives each sample the batch's normalisation
    torch.testing.assert_close(frozen(x[2:3]), train_out[2:3], rtol=1e-5, atol=1e-6)


def test_frozen_stats_without_running_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(3, 2)
    )
    x = torch.randn(4, 5)
    frozen = freeze_batch_stats(net, x)
    torch.testing.assert_close(frozen(x), net.train()(x))
    assert net[1].running_mean is None
    # buffers present but tracking switched off after construction
    net2 = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    net2[1].track_running_stats = False
    torch.testing.assert_close(freeze_batch_stats(net2, x)(x), net2.train()(x))


@pytest.mark.parametrize("bn_mode", ["fixed-stats", "coupled"])
def test_scoring_leaves_model_untouched(nets, bn_mode):
    f, g, x = nets
    f.eval()
    g.train()
    before = {k: v.clone() for k, v in {**f.state_dict(), **g.state_dict()}.items()}
    kappa(f, x, generator=g, params="all", bn_mode=bn_mode)
    te_nas_score(f, x, bn_mode=bn_mode)
    after = {**f.state_dict(), **g.state_dict()}
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert not f.training and g.training


@pytest.mark.parametrize("bn_mode", ["fixed-stats", "coupled"])
def test_batch_order_invariance(nets, bn_mode):
    f, g, x = nets
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = kappa(f, x, generator=g, params="generator", bn_mode=bn_mode)
    b = kappa(f, x[perm], generator=g, params="generator", bn_mode=bn_mode)
    assert b.eigenvalues == pytest.approx(a.eigenvalues, rel=1e-5)


def test_dead_output_is_flagged():
    torch.manual_seed(0)
    f = tiny_classifier()
    mask = torch.ones(C)  # logit 2 is multiplied by 0: its Jacobian row is zero
    mask[2] = 0
    dead = nn.Sequential(f, _Scale(mask))
    res = kappa(dead, torch.rand(5, 3, 8, 8), params="arch")
    assert res.flagged and res.kappa == math.inf


class _Scale(nn.Module):
    def __init__(self, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("s", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def test_fewer_params_than_logits_is_flagged():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    # the bias Jacobian is the identity: K = I, kappa = 1 (a known case)
    res = kappa(
        f, torch.rand(4, 3, 2, 2), params="all", param_filter=lambda name, p: name.endswith("bias")
    )
    assert not res.flagged
    assert res.kappa == pytest.approx(1.0)
    g = nn.Sequential(nn.Flatten(), nn.Linear(12, 1), nn.Linear(1, 5))
    # 13 parameters of the first layer, but J_n = w2 [x_n^T, 1] has rank 1 < C = 5
    res2 = kappa(
        g,
        torch.rand(4, 3, 2, 2),
        params="all",
        param_filter=lambda name, p: name.startswith("classifier.1."),
    )
    assert res2.flagged and res2.kappa == math.inf


def test_condition_number_flags_negative_and_nan():
    assert condition_number(torch.diag(torch.tensor([-1.0, 2.0], dtype=torch.float64))).flagged
    assert condition_number(
        torch.tensor([[float("nan"), 0], [0, 1.0]], dtype=torch.float64)
    ).flagged
    ok = condition_number(torch.diag(torch.tensor([0.5, 2.0], dtype=torch.float64)))
    assert not ok.flagged and ok.kappa == pytest.approx(4.0)


def test_kappa_scores_reproducible_and_median():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    kw = dict(build_generator=TinyGenerator, n_init=3, seed=7)
    a = kappa_scores(tiny_classifier, x, **kw)
    rng = torch.get_rng_state()
    b = kappa_scores(tiny_classifier, x, **kw)
    assert torch.equal(rng, torch.get_rng_state())  # caller's RNG untouched
    assert a == b and math.isfinite(a["kappa_arch"])
    assert set(a) == {
        f"kappa_{v}{s}" for v in ("generator", "arch", "bare") for s in ("", "_flagged")
    }
    # the median equals the middle of the three single-init kappas
    singles = []
    for i in range(3):
        torch.manual_seed(7 + i)
        f = tiny_classifier()
        torch.manual_seed(7 + i)
        g = TinyGenerator()
        singles.append(kappa(f, x, generator=g, params="generator").kappa)
    assert a["kappa_generator"] == pytest.approx(sorted(singles)[1], rel=1e-12)
    assert a["kappa_generator_flagged"] == 0.0
    other = kappa_scores(tiny_classifier, x, variants=("bare",), n_init=1, seed=99)
    assert other["kappa_bare"] != a["kappa_bare"]
    assert METRICS.get("kappa") is kappa_scores


def test_te_nas_matches_brute_force(nets):
    f, _, x = nets
    params = list(f.parameters())
    for mode in ("fixed-stats", "coupled"):
        ref_f = copy.deepcopy(f)
        for m in ref_f.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.forward = types.MethodType(
                    lambda self, inp, d=(mode == "fixed-stats"): _batch_stat_bn(self, inp, d), m
                )
        params = list(ref_f.parameters())
        out = ref_f(x)
        rows = [
            torch.cat(
                [
                    gr.reshape(-1)
                    for gr in torch.autograd.grad(out[i].sum(), params, retain_graph=True)
                ]
            ).double()
            for i in range(x.shape[0])
        ]
        gm = torch.stack(rows)
        ref = brute_kappa(gm @ gm.T)
        assert te_nas_score(f, x, bn_mode=mode) == pytest.approx(ref, rel=1e-4)
    assert METRICS.get("te_nas") is te_nas_score


def test_float64_kernel_matches_float64_model(nets):
    # PROTOCOLS 5 "Precision": float32 Jacobians, float64 kernel, vs everything in float64
    f, g, x = nets
    a = kappa(f, x, generator=g, params="generator")
    b = kappa(f.double(), x.double(), generator=g.double(), params="generator")
    assert a.kappa == pytest.approx(b.kappa, rel=1e-3)


def test_unknown_options_raise(nets):
    from nasrisk.trials.errors import UserError

    f, g, x = nets
    with pytest.raises(UserError):
        kappa(f, x, params="generator")  # no generator
    with pytest.raises(UserError):
        kappa(f, x, params="arch", bn_mode="batch")
    with pytest.raises(UserError):
        kappa_scores(tiny_classifier, x, variants=("bare", "foo"))
    with pytest.raises(UserError):
        kappa(f, x, params="all", param_filter=lambda n, p: False)


def test_shared_batchnorm_rejected_in_fixed_stats():
    from nasrisk.trials.errors import UserError

    bn = nn.BatchNorm1d(3)
    net = nn.Sequential(nn.Linear(3, 3), bn, nn.Linear(3, 3), bn, nn.Linear(3, 2))
    with pytest.raises(UserError):
        kappa(net, torch.randn(4, 3), params="arch")
    assert not kappa(net, torch.randn(4, 3), params="arch", bn_mode="coupled").flagged


@pytest.mark.parametrize("bn_mode", ["fixed-stats", "coupled"])
def test_kappa_nats_with_trigger_generator_matches_brute_force(bn_mode):
    from nasrisk.trials.models.generator import TriggerGenerator
    from nasrisk.trials.models.nats import TinyNetwork

    torch.manual_seed(0)
    arch = "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|nor_conv_1x1~0|avg_pool_3x3~1|nor_conv_3x3~2|"
    f = TinyNetwork(arch, C=4, N=1, num_classes=C)
    g = TriggerGenerator()
    x = torch.rand(4, 3, 8, 8)
    for which in ("arch", "generator"):
        res = kappa(f, x, generator=g, params=which, bn_mode=bn_mode)
        ref = brute_kernel(f, x, generator=g, which=which, bn_mode=bn_mode)
        assert not res.flagged
        assert res.kappa == pytest.approx(brute_kappa(ref), rel=1e-4)
        assert res.eigenvalues == pytest.approx(torch.linalg.eigvalsh(ref).tolist(), rel=1e-4)
