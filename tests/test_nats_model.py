"""The NATS-Bench TinyNetwork (PROTOCOLS 1.1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nasrisk.trials.context import TrialContext
from nasrisk.trials.data import load_dataset
from nasrisk.trials.errors import UserError
from nasrisk.trials.metrics.ntk_kernel import arch_weight_names
from nasrisk.trials.models.nats import ArchStringError, TinyNetwork, build_nats, parse_arch
from nasrisk.trials.models.nats.network import Cell, ResidualReduction
from nasrisk.trials.models.wrapper import Normalized
from nasrisk.trials.registry import MODELS
from nasrisk.trials.train import TrainConfig, predict_logits, train

RESNET_LIKE = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
MIXED = "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|nor_conv_3x3~2|"


@pytest.mark.parametrize("arch", [RESNET_LIKE, ALL_NONE, MIXED])
@pytest.mark.parametrize("C,N,size", [(8, 1, 32), (16, 5, 32), (8, 1, 16), (16, 5, 16)])
def test_forward_shapes(arch, C, N, size):
    torch.manual_seed(0)
    net = TinyNetwork(arch, C=C, N=N, num_classes=7)
    assert len(net.cells) == 3 * N + 2
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_registry_builds_nats():
    net = MODELS.get("nats")(num_classes=10, input_size=32, arch=MIXED, C=4, N=1)
    assert isinstance(net, TinyNetwork) and net.arch == MIXED
    assert MODELS.meta("nats")["family"] == "nats"
    with pytest.raises(UserError, match="divisible by 4"):
        build_nats(num_classes=10, input_size=30, arch=MIXED)
    with pytest.raises(ArchStringError):
        build_nats(num_classes=10, arch="|none~0|")


def test_parameter_count_by_hand():
    # C=4, N=1, 10 classes: widths [4], red 4->8, [8], red 8->16, [16]
    stem = 3 * 4 * 9 + 2 * 4

    def cell(c):  # RESNET_LIKE: two nor_conv_3x3 edges (conv + BN gamma/beta), rest parameter-free
        return 2 * (c * c * 9 + 2 * c)

    def red(a, b):  # conv_a (stride 2) + BN, conv_b + BN, shortcut conv1x1
        return a * b * 9 + 2 * b + b * b * 9 + 2 * b + a * b

    head = 2 * 16 + 16 * 10 + 10  # lastact BN, linear
    expected = stem + cell(4) + red(4, 8) + cell(8) + red(8, 16) + cell(16) + head
    assert expected == 11054
    net = TinyNetwork(RESNET_LIKE, C=4, N=1, num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == expected
    # kappa's `arch` set (PROTOCOLS 5: names containing 'weight', as the EVAS reference): all but
    # BN betas (stem 4, cells 2*(4+8+16), reductions 8+8+16+16, last 16) and the linear bias (10)
    names = arch_weight_names(net)
    chosen = dict(net.named_parameters())
    assert sum(chosen[n].numel() for n in names) == expected - 124 - 10
    assert "classifier.weight" in names and "classifier.bias" not in names
    assert "stem.1.weight" in names and "stem.1.bias" not in names
    assert sum(p.numel() for p in TinyNetwork(ALL_NONE, C=4, N=1, num_classes=10).parameters()) \
        == stem + red(4, 8) + red(8, 16) + head


def test_cell_semantics_reduce_to_known_functions():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, 8)
    identity = Cell(parse_arch("|skip_connect~0|+|none~0|none~1|+|none~0|skip_connect~1|none~2|"), 5)
    assert torch.equal(identity(x), x)
    # all skips: node1 = x, node2 = x + x, node3 = x + node1 + node2 = 4x
    four = Cell(parse_arch("|skip_connect~0|+|skip_connect~0|skip_connect~1|+|skip_connect~0|skip_connect~1|skip_connect~2|"), 5)
    torch.testing.assert_close(four(x), 4 * x)
    pool = Cell(parse_arch("|none~0|+|none~0|none~1|+|avg_pool_3x3~0|none~1|none~2|"), 5)
    ref = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(pool(x), ref)
    assert not torch.allclose(ref, F.avg_pool2d(x, 3, stride=1, padding=1))  # border differs
    zero = Cell(parse_arch(ALL_NONE), 5)
    assert torch.equal(zero(x), torch.zeros_like(x))
    # conv3x3 on (1,0) then skip (3,1): ReLU -> Conv(pad 1, no bias) -> BN (batch stats)
    conv = Cell(parse_arch("|nor_conv_3x3~0|+|none~0|none~1|+|none~0|skip_connect~1|none~2|"), 5)
    relu_conv_bn = conv.edges[0]
    w, bn = relu_conv_bn[1].weight, relu_conv_bn[2]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    assert relu_conv_bn[1].bias is None
    y = F.conv2d(F.relu(x), w, padding=1)
    ref = F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    torch.testing.assert_close(conv(x), ref)


def test_residual_reduction_block():
    torch.manual_seed(0)
    block = ResidualReduction(4, 8)
    x = torch.randn(3, 4, 8, 8)
    a, b = block.conv_a, block.conv_b
    h = F.batch_norm(F.conv2d(F.relu(x), a[1].weight, stride=2, padding=1), None, None,
                     a[2].weight, a[2].bias, training=True)
    h = F.batch_norm(F.conv2d(F.relu(h), b[1].weight, padding=1), None, None,
                     b[2].weight, b[2].bias, training=True)
    short = F.conv2d(F.avg_pool2d(x, 2), block.shortcut[1].weight)
    out = block(x)
    assert out.shape == (3, 8, 4, 4)
    torch.testing.assert_close(out, short + h)


def test_all_none_arch_trains_and_predicts_one_class():
    data = load_dataset("embedded")
    torch.manual_seed(0)
    net = Normalized(TinyNetwork(ALL_NONE, C=4, N=1, num_classes=10), data.info.mean, data.info.std)
    cfg = TrainConfig(epochs=1, batch_size=96, lr=0.05, augment="none", amp=False,
                      eval_each_epoch=False)
    result = train(net, data.subset(n_train=192), cfg, seed=0, ctx=TrialContext(device="cpu"))
    assert result["train_loss"] == result["train_loss"]  # finite, not NaN
    logits = predict_logits(net, data.x_test, device="cpu")
    pred = logits.argmax(1)
    # the classifier sees zeros: one class for every input, accuracy = that class's share
    assert (pred == pred[0]).all()
    torch.testing.assert_close(logits, logits[:1].expand_as(logits))
    assert result["test_acc"] == pytest.approx((data.y_test == pred[0]).float().mean().item())
    # a live arch trained the same way does depend on its input
    torch.manual_seed(0)
    live = Normalized(TinyNetwork(RESNET_LIKE, C=4, N=1, num_classes=10), data.info.mean, data.info.std)
    train(live, data.subset(n_train=192, n_test=50), cfg, seed=0, ctx=TrialContext(device="cpu"))
    live_logits = predict_logits(live, data.x_test[:50], device="cpu")
    assert (live_logits - live_logits[:1]).abs().max() > 1e-3


def test_arch_weights_have_gradients_even_with_dead_edges():
    torch.manual_seed(0)
    for arch in (ALL_NONE, RESNET_LIKE):
        net = TinyNetwork(arch, C=4, N=1, num_classes=10)
        named = dict(net.named_parameters())
        params = [named[n] for n in arch_weight_names(net)]
        grads = torch.autograd.grad(net(torch.randn(4, 3, 16, 16)).sum(), params)
        assert len(grads) == len(params)
        assert all(g.shape == p.shape for g, p in zip(grads, params, strict=True))
