"""NATS-Bench topology space arch strings (PROTOCOLS 1.1, 5)."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from nasrisk.trials.errors import UserError
from nasrisk.trials.models.nats.arch_string import (
    EDGES,
    MUTATION_WEIGHTS,
    OPS,
    ArchStringError,
    all_archs,
    format_arch,
    isomorphism_key,
    mutate,
    op_counts,
    parse_arch,
    sample_archs,
    unique_archs,
)

RESNET_LIKE = "|nor_conv_3x3~0|+|none~0|nor_conv_3x3~1|+|skip_connect~0|none~1|skip_connect~2|"


def test_edges_and_format_are_the_community_format():
    assert EDGES == ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
    ops = ("nor_conv_3x3", "none", "nor_conv_3x3", "skip_connect", "none", "skip_connect")
    assert format_arch(ops) == RESNET_LIKE
    assert parse_arch(RESNET_LIKE) == ops


def test_round_trip_all_archs():
    archs = all_archs()
    assert len(archs) == 5**6 == len(set(archs))
    assert archs[0] == "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    # product order: the last edge varies fastest
    assert archs[1] == "|none~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|"
    assert [parse_arch(s) for s in archs] == list(itertools.product(OPS, repeat=6))
    assert all(format_arch(parse_arch(s)) == s for s in archs)


def test_op_counts_hand_checked():
    assert op_counts(RESNET_LIKE) == {"none": 2, "skip_connect": 2, "nor_conv_1x1": 0,
                                      "nor_conv_3x3": 2, "avg_pool_3x3": 0}
    s = "|avg_pool_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|nor_conv_1x1~0|skip_connect~1|nor_conv_3x3~2|"
    assert op_counts(s) == {"none": 0, "skip_connect": 2, "nor_conv_1x1": 2,
                            "nor_conv_3x3": 1, "avg_pool_3x3": 1}
    assert op_counts(all_archs()[0]) == {op: (6 if op == "none" else 0) for op in OPS}


def test_isomorphism_class_counts_pin_the_published_quirk():
    archs = all_archs()
    assert len({isomorphism_key(s) for s in archs}) == 6466
    assert len({isomorphism_key(s, zeros="all") for s in archs}) == 6285
    reps = unique_archs()
    assert len(reps) == 6466
    assert len({isomorphism_key(s) for s in reps}) == 6466
    # first of each class in all_archs order
    pos = {s: i for i, s in enumerate(archs)}
    first: dict[str, int] = {}
    for i, s in enumerate(archs):
        first.setdefault(isomorphism_key(s), i)
    assert sorted(pos[s] for s in reps) == sorted(first.values())


def test_isomorphic_pairs():
    # node 1 is zero (none from the input): every op leaving it is dead.
    a = "|none~0|+|nor_conv_3x3~0|none~1|+|skip_connect~0|none~1|nor_conv_1x1~2|"
    b = "|none~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|avg_pool_3x3~1|nor_conv_1x1~2|"
    assert isomorphism_key(a) == isomorphism_key(b)
    # the order of a node's inputs does not matter (sum is commutative)
    c = "|nor_conv_1x1~0|+|nor_conv_3x3~0|skip_connect~1|+|none~0|none~1|skip_connect~2|"
    d = "|nor_conv_3x3~0|+|nor_conv_1x1~0|skip_connect~1|+|none~0|none~1|skip_connect~2|"
    assert isomorphism_key(c) == isomorphism_key(d)
    # skip_connect is transparent: x -> skip -> conv (into node 2) equals x -> conv
    e = "|skip_connect~0|+|none~0|nor_conv_3x3~1|+|none~0|none~1|skip_connect~2|"
    f = "|none~0|+|nor_conv_3x3~0|none~1|+|none~0|none~1|skip_connect~2|"
    assert isomorphism_key(e) == isomorphism_key(f) == "#+#+#+(0)@nor_conv_3x3"
    # non-isomorphic: a different op on a live edge
    g = a.replace("nor_conv_1x1~2", "nor_conv_3x3~2")
    assert isomorphism_key(a) != isomorphism_key(g)


def test_quirk_node_with_two_zero_inputs_is_not_zero():
    # node 2 = none + none = "#+#" is not zero under the published rule, so a conv on edge
    # (3, 2) still counts although it computes nothing; the "all" rule merges the pair.
    base = "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"
    dead_conv = "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|nor_conv_3x3~2|"
    assert isomorphism_key(base) != isomorphism_key(dead_conv)
    assert isomorphism_key(dead_conv) == "#+(#+#)@nor_conv_3x3+0"
    assert isomorphism_key(base, zeros="all") == isomorphism_key(dead_conv, zeros="all")


def test_sample_archs_distinct_reproducible_seeded():
    a = sample_archs(200, seed=3)
    assert a == sample_archs(200, seed=3)
    assert a != sample_archs(200, seed=4)
    assert len({isomorphism_key(s) for s in a}) == 200
    assert all(s in set(all_archs()) for s in a)
    s = sample_archs(500, seed=3, distinct="string")
    assert len(set(s)) == 500 and s == sample_archs(500, seed=3, distinct="string")
    # every class can be drawn, and not more
    full = sample_archs(6466, seed=1)
    assert len({isomorphism_key(x) for x in full}) == 6466
    assert len(set(sample_archs(15625, seed=1, distinct="string"))) == 15625
    with pytest.raises(UserError, match="6466"):
        sample_archs(6467, seed=0)
    with pytest.raises(UserError, match="15625"):
        sample_archs(15626, seed=0, distinct="string")


def test_sample_archs_draws_classes_in_proportion_to_size():
    # a random arch string lands in a class of size k with probability k * (#classes of size
    # k) / 15625: the mean class size of a first draw is sum(size^2) / 15625 (about 36),
    # whereas drawing classes uniformly would give 15625 / 6466 (about 2.4)
    sizes = Counter(isomorphism_key(s) for s in all_archs())
    size_biased = sum(v * v for v in sizes.values()) / 15625
    firsts = [sample_archs(1, seed=seed)[0] for seed in range(150)]
    got = sum(sizes[isomorphism_key(s)] for s in firsts) / len(firsts)
    assert 30 < size_biased < 40
    assert abs(got - size_biased) < 0.25 * size_biased, (got, size_biased)


def test_mutate_changes_exactly_one_edge_with_weights():
    rng = random.Random(0)
    arch = RESNET_LIKE
    new_ops: Counter[str] = Counter()
    edges: Counter[int] = Counter()
    n = 6000
    for _ in range(n):
        child = mutate(arch, rng)
        diff = [i for i, (x, y) in enumerate(zip(parse_arch(arch), parse_arch(child), strict=True)) if x != y]
        assert len(diff) == 1
        edges[diff[0]] += 1
        if parse_arch(arch)[diff[0]] == "nor_conv_3x3":
            new_ops[parse_arch(child)[diff[0]]] += 1
    assert set(edges) == set(range(6)) and min(edges.values()) > n / 6 * 0.85
    # from conv3x3 the other ops have weights none 1, skip 2, conv1x1 3, pool 1 (total 7)
    total = sum(new_ops.values())
    assert "nor_conv_3x3" not in new_ops
    for op, w in MUTATION_WEIGHTS.items():
        if op != "nor_conv_3x3":
            assert abs(new_ops[op] / total - w / 7) < 0.04
    assert mutate(arch, random.Random(5)) == mutate(arch, random.Random(5))


@pytest.mark.parametrize("bad", [
    "",
    "|none~0|+|none~0|none~1|",  # two groups
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|+|none~0|",  # four groups
    "|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # unknown op
    "|none~1|+|none~0|none~1|+|none~0|none~1|none~2|",  # wrong source index
    "|none~0|+|none~1|none~0|+|none~0|none~1|none~2|",  # swapped sources
    "none~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # missing bar
    "|none~0+|none~0|none~1|+|none~0|none~1|none~2|",  # missing bar
    "|none~0|+|none~0|+|none~0|none~1|none~2|",  # too few edges in a group
    "|none|+|none~0|none~1|+|none~0|none~1|none~2|",  # no source
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2| ",  # trailing space
    "|none~0|+|none~0||none~1|+|none~0|none~1|none~2|",  # empty edge
])
def test_malformed_strings_raise(bad):
    with pytest.raises(ArchStringError) as info:
        parse_arch(bad)
    assert "\n" not in str(info.value) and str(info.value)
    assert isinstance(info.value, UserError)


def test_format_rejects_bad_ops():
    with pytest.raises(ArchStringError):
        format_arch(["none"] * 5)
    with pytest.raises(ArchStringError):
        format_arch(["none"] * 5 + ["conv"])
    with pytest.raises(ArchStringError):
        parse_arch(None)  # type: ignore[arg-type]
