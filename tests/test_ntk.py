"""kappa (PROTOCOLS 5) against a brute-force reference: explicit loops over samples and logits
with torch.autograd.grad, BatchNorm statistics computed by hand or by PyTorch's own modes.

Every brute-force comparison runs both sides in float64 (models and inputs), so the tolerances
(1e-8 and tighter) hold on any CPU kernel; the one float32 test bounds its error from the
problem's size."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn

from nasrisk.trials.errors import UserError
from nasrisk.trials.metrics.ntk import condition_number, kappa, kappa_scores, te_nas_score
from nasrisk.trials.metrics.ntk_kernel import (
    BN_MODES,
    Composed,
    freeze_batch_stats,
    logit_kernel,
    select_params,
)
from nasrisk.trials.registry import METRICS

C = 4
MODES = ("eval", "fixed-stats", "coupled")  # PROTOCOLS 5 "BatchNorm while scoring"
BN = nn.modules.batchnorm._BatchNorm
NATS_ARCH = (
    "|nor_conv_3x3~0|+|none~0|skip_connect~1|+|nor_conv_1x1~0|avg_pool_3x3~1|nor_conv_3x3~2|"
)


def close(a, b, rel):
    return pytest.approx(b, rel=rel, abs=0) == a


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
    """Non-trivial running stats and affine params, so a test sees if anything touches them
    and ``eval`` mode visibly uses the current running statistics. Positive betas keep the
    ReLUs of the 4-channel net alive in eval mode: with dead channels its kernel is near
    singular (kappa ~1e7-1e9) and no float64 comparison could be tight."""
    for m in module.modules():
        if isinstance(m, BN):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(0.2, 0.7, generator=gen)


def _make_nets():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    f, g = tiny_classifier(), TinyGenerator()
    _randomise_bn(f, gen)
    _randomise_bn(g, gen)
    x = torch.rand(6, 3, 8, 8, generator=gen)
    return f, g, x


@pytest.fixture
def nets():
    """float64 classifier, generator and batch."""
    f, g, x = _make_nets()
    return f.double(), g.double(), x.double()


@pytest.fixture
def nets32():
    return _make_nets()


def _batch_stat_bn(bn: nn.Module, inp: torch.Tensor, detach: bool) -> torch.Tensor:
    dims = [0] + list(range(2, inp.dim()))
    mean = inp.mean(dims, keepdim=True)
    var = inp.var(dims, unbiased=False, keepdim=True)
    if detach:
        mean, var = mean.detach(), var.detach()
    shape = [1, -1] + [1] * (inp.dim() - 2)
    return (inp - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def _prepare(f, g, bn_mode):
    """Copies of classifier and generator set up for ``bn_mode`` independently of the code
    under test: ``eval`` = PyTorch's eval mode for both; ``coupled`` = the reference's search
    script, classifier.train() (PyTorch's train-mode BN) and generator.eval(); ``fixed-stats``
    = every BN normalising with the batch's biased statistics computed by hand, detached."""
    f, g = copy.deepcopy(f), copy.deepcopy(g)
    f.eval()
    if g is not None:
        g.eval()
    if bn_mode == "coupled":
        f.train()
    elif bn_mode == "fixed-stats":
        for mod in (f, g):
            for m in mod.modules() if mod is not None else ():
                if isinstance(m, BN):
                    m.forward = types.MethodType(
                        lambda self, inp: _batch_stat_bn(self, inp, True), m
                    )
    return f, g


def _arch_params(f: nn.Module) -> list[nn.Parameter]:
    """The reference's `arch` set by module type: conv and linear weights and BN gammas; no
    biases, no BN betas."""
    return [
        m.weight
        for m in f.modules()
        if isinstance(m, nn.Conv2d | nn.Linear | BN) and m.weight is not None
    ]


def brute_kernel(f, x, *, generator=None, which, bn_mode):
    """K = mean_n J_n J_n^T by a loop over samples and logits (autograd.grad), in the dtype of
    the modules. ``eval`` forwards each sample on its own (a true per-sample loop); the batch
    modes forward the whole batch and take row n."""
    f, g = _prepare(f, generator, bn_mode)
    params = list(g.parameters()) if which == "generator" else _arch_params(f)

    def fwd(inp):
        return f(g(inp) if g is not None else inp)

    out = None if bn_mode == "eval" else fwd(x)
    n = x.shape[0]
    k = None
    for i in range(n):
        row = fwd(x[i : i + 1])[0] if bn_mode == "eval" else out[i]
        rows = []
        for j in range(row.shape[0]):
            grads = torch.autograd.grad(row[j], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                        for gr, p in zip(grads, params, strict=True)
                    ]
                ).double()
            )
        jn = torch.stack(rows)
        k = jn @ jn.T if k is None else k + jn @ jn.T
    return k / n


def brute_kappa(k: torch.Tensor) -> float:
    e = torch.linalg.eigvalsh(k)
    return float(e[-1] / e[0])


def assert_matches(res, ref: torch.Tensor, rel: float) -> None:
    eig = torch.linalg.eigvalsh(ref)
    assert not res.flagged
    assert close(res.kappa, brute_kappa(ref), rel)
    assert close(res.lambda_max, float(eig[-1]), rel)
    assert close(list(res.eigenvalues), eig.tolist(), rel)


@pytest.mark.parametrize("bn_mode", MODES)
@pytest.mark.parametrize("variant", ["generator", "arch", "bare"])
def test_kappa_matches_brute_force(nets, bn_mode, variant):
    f, g, x = nets
    gen = None if variant == "bare" else g
    which = "generator" if variant == "generator" else "arch"
    res = kappa(f, x, generator=gen, params=which, bn_mode=bn_mode)
    assert_matches(res, brute_kernel(f, x, generator=gen, which=which, bn_mode=bn_mode), 1e-8)


def test_eval_mode_is_a_per_sample_loop_in_eval_mode(nets):
    # PROTOCOLS 5 "BatchNorm while scoring": BN on its current running statistics, each sample's
    # Jacobian its own. Checked on the randomised running stats and on a fresh init (mean 0,
    # var 1: the reference's scoring), and it is not fixed-stats.
    f, g, x = nets
    for which in ("generator", "arch"):
        res = kappa(f, x, generator=g, params=which, bn_mode="eval")
        assert_matches(res, brute_kernel(f, x, generator=g, which=which, bn_mode="eval"), 1e-10)
        fixed = kappa(f, x, generator=g, params=which, bn_mode="fixed-stats")
        assert abs(res.kappa - fixed.kappa) / fixed.kappa > 1e-2
    # at a fresh init (running stats mean 0, var 1: the reference's scoring) see
    # test_kappa_nats_with_trigger_generator_matches_brute_force[eval]
    # a sample's kernel contribution does not depend on the rest of the batch
    names = select_params(Composed(f, g), "generator")
    whole = logit_kernel(Composed(f, g), x, names, bn_mode="eval") * x.shape[0]
    parts = sum(logit_kernel(Composed(f, g), x[i : i + 1], names, bn_mode="eval") for i in range(6))
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=0)


def test_coupled_scores_the_generator_in_eval_mode(nets):
    # the reference's search script: arch in train mode, generator in eval mode (its running
    # statistics), not the generator on batch statistics too
    f, g, x = nets
    for which in ("arch", "generator"):
        res = kappa(f, x, generator=g, params=which, bn_mode="coupled")
        assert_matches(res, brute_kernel(f, x, generator=g, which=which, bn_mode="coupled"), 1e-8)
        both_train = copy.deepcopy(g).train()
        for m in both_train.modules():
            if isinstance(m, BN):
                m.track_running_stats = False
        ref_train = brute_kernel(
            f, x, generator=_EvalProof(both_train), which=which, bn_mode="coupled"
        )
        assert abs(res.kappa - brute_kappa(ref_train)) / res.kappa > 1e-3


class _EvalProof(nn.Module):
    """Keeps a wrapped module in train mode whatever ``eval()`` is called on the wrapper."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True) -> _EvalProof:
        self.training = mode
        self.inner.train()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_bn_modes_differ(nets):
    # The brute-force matches above would be vacuous if two modes gave the same kernel.
    f, g, x = nets
    for which in ("generator", "arch"):
        k = {m: kappa(f, x, generator=g, params=which, bn_mode=m).kappa for m in MODES}
        for a in MODES:
            for b in MODES:
                if a < b:
                    assert abs(k[a] - k[b]) / k[a] > 1e-3, (which, a, b)


def test_arch_parameter_set_is_the_weight_tensors():
    # PROTOCOLS 5 "The arch parameter set": names containing `weight`, as the reference's
    # {n: p for n, p in model.named_parameters() if 'weight' in n}; the final linear bias is out
    from nasrisk.trials.models.nats import TinyNetwork

    net = TinyNetwork(NATS_ARCH, C=4, N=1, num_classes=10)
    names = select_params(Composed(net), "arch")
    assert names == ["classifier." + n for n, _ in net.named_parameters() if "weight" in n]
    assert "classifier.classifier.weight" in names
    assert "classifier.classifier.bias" not in names
    assert not any("bias" in n for n in names)
    table = dict(Composed(net).named_parameters())
    assert {id(table[n]) for n in names} == {id(p) for p in _arch_params(net)}
    f = tiny_classifier()  # conv and linear biases are out too
    got = {id(dict(Composed(f).named_parameters())[n]) for n in select_params(Composed(f), "arch")}
    assert got == {id(p) for p in _arch_params(f)}
    assert id(f[3].bias) not in got and id(f[11].bias) not in got


def test_chunking_does_not_change_kernel(nets):
    f, g, x = nets
    for mode in MODES:
        whole = kappa(f, x, generator=g, params="all", bn_mode=mode)
        chunked = kappa(f, x, generator=g, params="all", bn_mode=mode, chunk_size=4)
        assert close(list(chunked.eigenvalues), list(whole.eigenvalues), 1e-10)


def test_frozen_stats_equal_train_mode_output(nets):
    # running_var is unbiased, train-mode BN normalises with the biased variance: the frozen
    # copy corrects for it. BatchNorm1d sees 6 values per channel, so a missing (n-1)/n
    # correction (a relative change of ~1e-1) would be far above the float64 tolerance.
    f, g, x = nets
    model = nn.Sequential(g, f)
    frozen = freeze_batch_stats(model, x)
    train_out = copy.deepcopy(model).train()(x)
    assert not frozen.training
    torch.testing.assert_close(frozen(x), train_out, rtol=1e-10, atol=1e-12)
    # per sample, the frozen copy gives each sample the batch's normalisation
    torch.testing.assert_close(frozen(x[2:3]), train_out[2:3], rtol=1e-10, atol=1e-12)


def test_frozen_stats_without_running_buffers():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 3), nn.BatchNorm1d(3, track_running_stats=False), nn.Linear(3, 2)
    ).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    frozen = freeze_batch_stats(net, x)
    torch.testing.assert_close(frozen(x), net.train()(x), rtol=1e-10, atol=1e-12)
    assert net[1].running_mean is None
    # buffers present but tracking switched off after construction
    net2 = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    net2[1].track_running_stats = False
    torch.testing.assert_close(
        freeze_batch_stats(net2, x)(x), net2.train()(x), rtol=1e-10, atol=1e-12
    )
    # eval mode needs running statistics: without them PyTorch would use the batch's
    with pytest.raises(UserError, match="running statistics"):
        kappa(net, x, params="arch", bn_mode="eval")


@pytest.mark.parametrize("bn_mode", MODES)
def test_scoring_leaves_model_untouched(nets, bn_mode):
    f, g, x = nets
    f.eval()
    g.train()
    before = {k: v.clone() for k, v in {**f.state_dict(), **g.state_dict()}.items()}
    kappa(f, x, generator=g, params="all", bn_mode=bn_mode)
    kappa(f, x, generator=g, params="arch", bn_mode=bn_mode)
    te_nas_score(f, x, bn_mode=bn_mode)
    after = {**f.state_dict(), **g.state_dict()}
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k  # incl. the generator's BN running stats
    assert not f.training and g.training


@pytest.mark.parametrize("bn_mode", MODES)
def test_batch_order_invariance(nets, bn_mode):
    f, g, x = nets
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = kappa(f, x, generator=g, params="generator", bn_mode=bn_mode)
    b = kappa(f, x[perm], generator=g, params="generator", bn_mode=bn_mode)
    assert close(list(b.eigenvalues), list(a.eigenvalues), 1e-10)


def test_dead_output_is_flagged():
    torch.manual_seed(0)
    f = tiny_classifier()
    mask = torch.ones(C)  # logit 2 is multiplied by 0: its Jacobian row is zero
    mask[2] = 0
    dead = nn.Sequential(f, _Scale(mask)).double()
    for mode in MODES:
        res = kappa(dead, torch.rand(5, 3, 8, 8, dtype=torch.float64), params="arch", bn_mode=mode)
        assert res.flagged and res.kappa == math.inf


class _Scale(nn.Module):
    def __init__(self, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("s", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def test_fewer_params_than_logits_is_flagged():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64)
    # the bias Jacobian is the identity: K = I, kappa = 1 (a known case)
    res = kappa(f, x, params="all", param_filter=lambda name, p: name.endswith("bias"))
    assert not res.flagged
    assert res.kappa == pytest.approx(1.0, rel=1e-12)
    g = nn.Sequential(nn.Flatten(), nn.Linear(12, 1), nn.Linear(1, 5)).double()
    # 13 parameters of the first layer, but J_n = w2 [x_n^T, 1] has rank 1 < C = 5
    res2 = kappa(g, x, params="all", param_filter=lambda name, p: name.startswith("classifier.1."))
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
    # the median equals the middle of the three single-init kappas, in the default mode eval
    # (the same float32 computation on both sides: equal to round-off of the median's copy)
    singles = []
    for i in range(3):
        torch.manual_seed(7 + i)
        f = tiny_classifier()
        torch.manual_seed(7 + i)
        g = TinyGenerator()
        singles.append(kappa(f, x, generator=g, params="generator", bn_mode="eval"))
    assert a["kappa_generator"] == pytest.approx(sorted(r.kappa for r in singles)[1], rel=1e-12)
    # (at this fresh init, in eval mode, one of the three tiny nets has a numerically singular
    # kernel, eigenvalues 5e-21 .. 1e-5, and is flagged; fixed-stats rescales it away)
    assert a["kappa_generator_flagged"] == sum(r.flagged for r in singles) / 3
    other = kappa_scores(tiny_classifier, x, variants=("bare",), n_init=1, seed=99)
    assert other["kappa_bare"] != a["kappa_bare"]
    assert METRICS.get("kappa").fn is kappa_scores


def test_te_nas_matches_brute_force(nets):
    f, _, x = nets
    for mode in MODES:
        ref_f, _ = _prepare(f, None, mode)
        params = list(ref_f.parameters())
        rows = []
        for i in range(x.shape[0]):
            out = ref_f(x[i : i + 1])[0] if mode == "eval" else ref_f(x)[i]
            rows.append(
                torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(out.sum(), params)])
            )
        gm = torch.stack(rows)
        assert close(te_nas_score(f, x, bn_mode=mode), brute_kappa(gm @ gm.T), 1e-8)
    assert METRICS.get("te_nas").fn is te_nas_score


def _depth_and_fan_in(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Leaf modules on the path, and the longest sum one output value of them accumulates
    (conv / linear fan-in, BatchNorm batch reductions)."""
    leaves, fan = [0], [1]

    def hook(m: nn.Module, args: tuple, _out: object) -> None:
        leaves[0] += 1
        if isinstance(m, nn.Conv2d):
            fan[0] = max(fan[0], m.in_channels * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            fan[0] = max(fan[0], m.in_features)
        elif isinstance(m, BN):
            fan[0] = max(fan[0], args[0].numel() // args[0].shape[1])

    hs = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    with torch.no_grad():
        module(x)
    for h in hs:
        h.remove()
    return leaves[0], fan[0]


@pytest.mark.parametrize("bn_mode", MODES)
def test_float32_kernel_error_within_its_bound(nets32, bn_mode):
    # PROTOCOLS 5 "Precision": float32 Jacobians, kernel accumulated and decomposed in float64,
    # against everything in float64. Bound from the problem's size, not tuned to one CPU: each
    # Jacobian entry comes out of `depth` layers whose values are sums of at most `fan_in`
    # float32 terms; the worst-case summation bound of each layer (any summation order, so any
    # CPU kernel), added over the layers, gives eps_J = depth * fan_in * eps32 for the relative
    # (Frobenius) error of J (an estimate: it ignores cancellation, which these well-conditioned
    # nets do not show). Given that, K = mean J_n J_n^T
    # then moves by at most (2 eps_J + eps_J^2) trace(K) (Frobenius), and by Weyl each eigenvalue
    # by at most ||dK||_2 <= ||dK||_F. Measured (native AVX-512): ||dK||_F / trace(K) = 1.3e-7
    # (eval), 2.3e-6 (fixed-stats), 2.8e-7 (coupled); the bound 2 eps_J = 1.4e-3 (depth 15,
    # fan-in 384).
    f, g, x = nets32
    composed = Composed(f, g)
    names = select_params(composed, "generator")
    k = logit_kernel(composed, x, names, bn_mode=bn_mode)
    assert k.dtype == torch.float64
    gold = logit_kernel(copy.deepcopy(composed).double(), x.double(), names, bn_mode=bn_mode)
    depth, fan_in = _depth_and_fan_in(copy.deepcopy(composed).train(), x)
    eps_j = depth * fan_in * torch.finfo(torch.float32).eps
    d = float(torch.linalg.matrix_norm(k - gold))
    assert d <= (2 * eps_j + eps_j**2) * float(torch.trace(gold))
    eig = torch.linalg.eigvalsh(gold)
    lo, hi = float(eig[0]), float(eig[-1])
    assert lo > d  # the bound is meaningful: lambda_min is resolved
    res = condition_number(k)
    assert (hi - d) / (lo + d) <= res.kappa <= (hi + d) / (lo - d)


def test_unknown_options_raise(nets):
    f, g, x = nets
    assert BN_MODES == MODES
    with pytest.raises(UserError):
        kappa(f, x, params="generator")  # no generator
    with pytest.raises(UserError):
        kappa(f, x, params="arch", bn_mode="batch")
    with pytest.raises(UserError):
        kappa_scores(tiny_classifier, x, variants=("bare", "foo"))
    with pytest.raises(UserError):
        kappa(f, x, params="all", param_filter=lambda n, p: False)


def test_shared_batchnorm_rejected_in_fixed_stats():
    bn = nn.BatchNorm1d(3)
    net = nn.Sequential(nn.Linear(3, 3), bn, nn.Linear(3, 3), bn, nn.Linear(3, 2))
    with pytest.raises(UserError):
        kappa(net, torch.randn(4, 3), params="arch", bn_mode="fixed-stats")
    assert not kappa(net, torch.randn(4, 3), params="arch", bn_mode="coupled").flagged
    assert not kappa(net, torch.randn(4, 3), params="arch", bn_mode="eval").flagged


@pytest.mark.parametrize("bn_mode", MODES)
def test_kappa_nats_with_trigger_generator_matches_brute_force(bn_mode):
    # the real NATS net and trigger generator (smoke widths), both sides in float64: the
    # float32 version of this test failed on an AVX2 machine at rel 1.1e-4
    from nasrisk.trials.models.generator import TriggerGenerator
    from nasrisk.trials.models.nats import TinyNetwork

    torch.manual_seed(0)
    f = TinyNetwork(NATS_ARCH, C=4, N=1, num_classes=C).double()
    g = TriggerGenerator(channels=(8, 16, 32)).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    for which in ("arch", "generator"):
        res = kappa(f, x, generator=g, params=which, bn_mode=bn_mode)
        assert_matches(res, brute_kernel(f, x, generator=g, which=which, bn_mode=bn_mode), 1e-8)


def test_kappa_config_default_is_eval():
    # PROTOCOLS 5: `eval` is the default of the kappa config and of the evas-kappa study
    from nasrisk.study.plan import RunOptions, build_plan
    from nasrisk.study.spec import load_spec
    from nasrisk.trials.kinds.evas import KappaConfig

    assert KappaConfig().bn_mode == "eval"
    spec = load_spec("evas-kappa")
    for profile in spec.profiles:
        plan = build_plan(spec, RunOptions(profile=profile, num_archs=1))
        trials = [t for s in plan.stages for t in s.trials]
        assert trials and all(t.config["kappa"]["bn_mode"] == "eval" for t in trials)
