"""A found genotype travels as a string (a search's param, a lineage base's model_kwargs):
format -> parse is the identity on every registered genotype, the DARTS code's own printed
form parses, and malformed strings fail with a message naming the problem."""

import pytest

from nasrisk.trials.models.darts.genotypes import GENOTYPES, format_genotype, parse_genotype


@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_format_then_parse_is_identity(name):
    g = GENOTYPES[name]
    back = parse_genotype(format_genotype(g))
    assert (back.normal, back.normal_concat, back.reduce, back.reduce_concat) == (
        g.normal, g.normal_concat, g.reduce, g.reduce_concat)


def test_the_darts_codes_printed_form_parses():
    # DARTS V2 as the DARTS code prints it (concat as range(2, 6))
    text = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
            "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
            "('dil_conv_3x3', 2)], normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), "
            "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
            "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], "
            "reduce_concat=range(2, 6))")
    g = parse_genotype(text)
    assert g.normal == GENOTYPES["darts"].normal and g.normal_concat == (2, 3, 4, 5)
    assert g.reduce == GENOTYPES["darts"].reduce


@pytest.mark.parametrize("text, problem", [
    ("normal=[]", "starts with"),
    ("Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2])", "lacks"),
    ("Genotype(normal=__import__('os'), normal_concat=[2], reduce=[], reduce_concat=[2])",
     "not a literal"),
    ("Genotype(normal=[('no_such_op', 0), ('skip_connect', 1)], normal_concat=[2], "
     "reduce=[('skip_connect', 0), ('skip_connect', 1)], reduce_concat=[2])", "unknown op"),
    ("Genotype(colour=[1])", "not one of"),
])
def test_malformed_strings_name_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_genotype(text)


@pytest.mark.parametrize("name", ["darts", "enas"])
def test_the_genotype_model_builds_the_same_network_as_the_named_one(name):
    import torch

    from nasrisk.trials.registry import MODELS

    kw = dict(num_classes=10, input_size=28, C=8, layers=5)
    named = MODELS.get(name)(**kw)
    from_string = MODELS.get("genotype")(genotype=format_genotype(GENOTYPES[name]), **kw)
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    assert shapes(from_string) == shapes(named)
    other = MODELS.get("genotype")(genotype=format_genotype(GENOTYPES["pdarts"]), **kw)
    assert shapes(other) != shapes(named)
    assert from_string(torch.zeros(1, 3, 28, 28)).shape == (1, 10)


def test_a_victim_built_from_a_genotype_string_logs_its_cell_statistics():
    from nasrisk.trials.kinds.victim import VictimConfig, extra_params

    named = extra_params(VictimConfig(model="pdarts", dataset="embedded"))
    searched = VictimConfig(model="genotype", dataset="embedded",
                            model_kwargs={"genotype": format_genotype(GENOTYPES["pdarts"]),
                                          "C": 8, "layers": 5})
    extra = extra_params(searched)
    assert extra["family"] == "searched"
    assert {k: extra[k] for k in ("cell_depth", "cell_width", "skip_count")} == {
        k: named[k] for k in ("cell_depth", "cell_width", "skip_count")}
    assert searched.key() != VictimConfig(model="pdarts", dataset="embedded",
                                          model_kwargs={"C": 8, "layers": 5}).key()
