"""DARTS space: ops, genotypes, NetworkCIFAR, architecture statistics (PROTOCOLS 1.2, 1.3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nasrisk.trials.errors import UserError
from nasrisk.trials.models.darts import GENOTYPES, build_network, get_genotype
from nasrisk.trials.models.darts.genotypes import DARTS_V2, Genotype
from nasrisk.trials.models.darts.network import Cell
from nasrisk.trials.models.darts.ops import OPS, make_op
from nasrisk.trials.models.darts.stats import genotype_stats, stats_table


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_darts_v2_parameter_count_matches_reference():
    # PROTOCOLS 1.2: 3,349,342 without the auxiliary head, 3,825,768 with it.
    assert n_params(build_network(DARTS_V2, num_classes=10)) == 3_349_342
    assert n_params(build_network(DARTS_V2, num_classes=10, auxiliary=True)) == 3_825_768
    # Dropout has no parameters: the artifact set has the same count.
    assert n_params(build_network(DARTS_V2, num_classes=10, params="artifact")) == 3_349_342


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
def test_op_shapes(name, stride, size):
    torch.manual_seed(0)
    op = make_op(name, 6, stride)
    y = op(torch.randn(2, 6, size, size))
    out = (size + stride - 1) // stride
    assert y.shape == (2, 6, out, out)


def test_reference_skip_counts():
    # PROTOCOLS 1.3's list of normal-cell skip counts.
    expected = {"amoebanet": 2, "darts": 2, "drnas": 1, "enas": 2, "nasnet": 2,
                "pc_darts": 1, "pdarts": 2, "sgas": 1, "snas": 4, "random": 2}
    assert {n: genotype_stats(n)["skip"] for n in expected} == expected


def test_variants_share_darts_reduce_cell():
    for name in ("darts-i", "darts-ii", "darts-iii"):
        g = get_genotype(name)
        assert g.reduce == DARTS_V2.reduce and g.reduce_concat == DARTS_V2.reduce_concat
        assert g.normal != DARTS_V2.normal
    # darts-i only rewires: the same multiset of ops as DARTS V2.
    assert sorted(op for op, _ in get_genotype("darts-i").normal) == sorted(
        op for op, _ in DARTS_V2.normal)


def test_stats_hand_counted():
    # Hand counts (depth counts the concat edge to the output; width = intermediate nodes fed
    # only by the input nodes, in units of c, the AutoML paper's Table 3 definition):
    # darts: 0->2->5->out = 3; nodes 2,3,4 fed only by inputs -> 3 (Shu et al.'s 3.5 counts
    # node 5 half). darts-i: 0->2->3->4->5->out = 5; only node 2 on inputs -> 1.
    # darts-ii: same wiring as darts -> 3, 3; no skips.  darts-iii: 5, 1, no skips.
    got = {n: (genotype_stats(n)["depth"], genotype_stats(n)["width"], genotype_stats(n)["skip"])
           for n in ("darts", "darts-i", "darts-ii", "darts-iii")}
    assert got == {"darts": (3, 3.0, 2), "darts-i": (5, 1.0, 2),
                   "darts-ii": (3, 3.0, 0), "darts-iii": (5, 1.0, 0)}
    # AmoebaNet (5 nodes, concat 4,5,6): 0->2->3->4->out = 4; fed only by inputs: 3 nodes
    # (Shu et al.'s fractional count 1+.5+.5+1+1 = 4).
    assert genotype_stats("amoebanet")["depth"] == 4
    assert genotype_stats("amoebanet")["width"] == 3.0
    assert genotype_stats("amoebanet")["width_shu"] == 4.0


def test_stats_table_covers_all_genotypes():
    rows = stats_table()
    assert [r["name"] for r in rows] == list(GENOTYPES)
    assert len(rows) == 13
    fam = {r["name"]: r["family"] for r in rows}
    assert fam["darts"] == "nas" and fam["darts-iii"] == "variant"


def test_genotype_validation():
    with pytest.raises(ValueError, match="cannot take input"):
        Genotype((("sep_conv_3x3", 2), ("sep_conv_3x3", 0)), (2,),
                 DARTS_V2.reduce, DARTS_V2.reduce_concat)
    with pytest.raises(ValueError, match="unknown op"):
        Genotype((("conv_9x9", 0), ("sep_conv_3x3", 0)), (2,),
                 DARTS_V2.reduce, DARTS_V2.reduce_concat)
    with pytest.raises(UserError, match="valid:"):
        get_genotype("nope")


def test_reduction_layers_and_widths():
    net = build_network(DARTS_V2, num_classes=10, C=8, layers=8)
    assert net.reduction_layers == (2, 5)
    assert [c.reduction for c in net.cells] == [i in (2, 5) for i in range(8)]
    # The classifier sees 4 concatenated nodes of 4C channels.
    assert net.classifier.in_features == 4 * 4 * 8


@pytest.mark.parametrize("size", [32, 16])
def test_forward_sizes(size):
    torch.manual_seed(0)
    net = build_network(get_genotype("nasnet"), num_classes=7, C=8, layers=5,
                        input_size=size, auxiliary=True)
    net.train()
    logits, aux = net.forward_aux(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 7) and aux.shape == (2, 7)
    net.eval()
    assert net.forward_aux(torch.randn(2, 3, size, size))[1] is None


def _all_one_op_genotype(op: str) -> Genotype:
    normal = ((op, 0), (op, 1)) * 4
    return Genotype(normal, (2, 3, 4, 5), DARTS_V2.reduce, DARTS_V2.reduce_concat)


def test_drop_path_skips_identity_and_only_in_training():
    torch.manual_seed(0)
    x0, x1 = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    # A cell of identities is never dropped, even at drop probability 0.99.
    cell = Cell(_all_one_op_genotype("skip_connect"), 16, 16, 8,
                reduction=False, reduction_prev=False).train()
    torch.manual_seed(1)
    a = cell(x0, x1, 0.0)
    torch.manual_seed(1)
    assert torch.allclose(cell(x0, x1, 0.99), a)
    # A cell of convolutions: at 0.99 most samples of every node are zeroed in training,
    # never in eval mode.
    cell = Cell(_all_one_op_genotype("sep_conv_3x3"), 16, 16, 8,
                reduction=False, reduction_prev=False)
    cell.train()
    torch.manual_seed(2)
    dropped = cell(x0, x1, 0.99)
    zero_samples = (dropped.flatten(1).abs().sum(1) == 0).sum().item()
    assert zero_samples >= 2
    cell.eval()
    assert torch.equal(cell(x0, x1, 0.99), cell(x0, x1, 0.0))


def test_paper_network_drop_path_train_only():
    torch.manual_seed(0)
    net = build_network(DARTS_V2, num_classes=10, C=8, layers=5, drop_path=0.5)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    assert torch.equal(net(x), net(x))
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())
    net.train()
    assert not torch.allclose(net(x), net(x))
    net.drop_path_prob = 0.0  # without drop-path training mode is deterministic too
    assert torch.equal(net(x), net(x))


def test_artifact_network_dropout_modules():
    net = build_network(DARTS_V2, num_classes=10, C=8, layers=5, params="artifact")
    assert net.drop_path_prob == 0.0 and net.auxiliary_head is None
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    # Hand count: 3 normal cells x 6 non-identity ops + 2 reduce cells x 5 (their skips take
    # node 2, stride 1, so they are identities).
    assert len(drops) == 3 * 6 + 2 * 5
    assert all(d.p == 0.2 for d in drops)
    with pytest.raises(UserError):
        build_network(DARTS_V2, num_classes=10, params="artifact", auxiliary=True)
    with pytest.raises(UserError):
        build_network(DARTS_V2, num_classes=10, params="bogus")


def test_stats_match_shu_et_al():
    # Shu et al. (ICLR 2020, Sec. 3) report depth/width of the published cells: NASNet 2/5c,
    # AmoebaNet 4/4c, ENAS 2/5c, DARTS 3/3.5c, SNAS 2/4c.
    want = {"nasnet": (2, 5.0), "amoebanet": (4, 4.0), "enas": (2, 5.0), "darts": (3, 3.5),
            "snas": (2, 4.0)}
    got = {n: (genotype_stats(n)["depth"], genotype_stats(n)["width_shu"]) for n in want}
    assert got == want
