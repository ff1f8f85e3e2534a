"""Architecture statistics against the AutoML paper's Table 3 (PROTOCOLS 1.3; Pang et al.,
USENIX Security 2022, Sec. 6): cell depth / cell width / skip connects of the 9 published NAS
genotypes, and the definitions that reproduce each column."""

from __future__ import annotations

import pytest

from nasrisk.trials.models.darts.genotypes import Genotype, get_genotype
from nasrisk.trials.models.darts.stats import (
    TABLE3,
    cell_depth,
    cell_width,
    genotype_stats,
    skip_count,
    stats_table,
)

# Table 3 as printed (depth, width in c, skip connects), transcribed independently of TABLE3.
PAPER = {"amoebanet": (4, 3, 2), "darts": (3, 3, 3), "drnas": (4, 2, 1), "enas": (2, 5, 2),
         "nasnet": (2, 5, 1), "pc_darts": (2, 4, 1), "pdarts": (4, 2, 2), "sgas": (3, 2, 1),
         "snas": (2, 4, 4)}


def test_table3_constant_is_the_paper() -> None:
    assert TABLE3 == PAPER


@pytest.mark.parametrize("name", sorted(PAPER))
def test_depth_and_width_reproduce_every_row(name: str) -> None:
    # depth: connections on the longest input -> output path, the concat -> output one counted;
    # width: intermediate nodes fed only by the cell's input nodes
    s = genotype_stats(name)
    assert (s["depth"], s["width"]) == PAPER[name][:2]


def test_skip_column_normal_cell_reproduces_7_rows_and_explains_the_other_two() -> None:
    normal = {n: genotype_stats(n)["skip"] for n in PAPER}
    matched = {n for n in PAPER if normal[n] == PAPER[n][2]}
    assert matched == {"amoebanet", "drnas", "enas", "pc_darts", "pdarts", "sgas", "snas"}
    # DARTS: 3 = DARTS V2's reduction cell (its normal cell has 2); NASNet: 1 = its reduction cell
    assert (normal["darts"], genotype_stats("darts")["skip_reduce"]) == (2, 3)
    assert (normal["nasnet"], genotype_stats("nasnet")["skip_reduce"]) == (2, 1)
    # neither the reduction cell nor both cells together is a better single definition
    red = {n for n in PAPER if skip_count(get_genotype(n), "reduce") == PAPER[n][2]}
    both = {n for n in PAPER if skip_count(get_genotype(n)) + skip_count(get_genotype(n), "reduce")
            == PAPER[n][2]}
    assert red == {"darts", "drnas", "nasnet"}
    assert both == {"amoebanet", "enas", "pc_darts", "pdarts"}


def test_darts_v1_normal_cell_matches_the_darts_row_in_all_three_columns() -> None:
    # DARTS V1 (first-order; DARTS authors' genotype list): the other reading of the DARTS row.
    v1 = Genotype(
        (("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
         ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)),
        (2, 3, 4, 5), get_genotype("darts").reduce, (2, 3, 4, 5))
    assert (cell_depth(v1), cell_width(v1), skip_count(v1)) == PAPER["darts"]


def test_width_counts_only_nodes_fed_by_input_nodes_alone() -> None:
    # Shu et al.'s fractional count would give DARTS V2 3.5 (node 5 half) and AmoebaNet 4
    assert genotype_stats("darts")["width_shu"] == 3.5
    assert genotype_stats("amoebanet")["width_shu"] == 4.0
    assert isinstance(genotype_stats("darts")["width"], int)


def test_variants_and_random_rows() -> None:
    # darts-i/iii rewire into a chain: deeper (5) and narrower (1c) than DARTS V2 (3, 3c);
    # darts-ii keeps the wiring and drops the skips
    got = {n: (genotype_stats(n)["depth"], genotype_stats(n)["width"], genotype_stats(n)["skip"])
           for n in ("darts-i", "darts-ii", "darts-iii", "random")}
    assert got == {"darts-i": (5, 1, 2), "darts-ii": (3, 3, 0), "darts-iii": (5, 1, 0),
                   "random": (4, 1, 2)}
    rows = {r["name"]: r for r in stats_table()}
    assert rows["darts"]["table3"] == "3/3c/3" and rows["darts-i"]["table3"] == ""
