"""Architecture statistics of genotypes (PROTOCOLS 1.3) and the model table of the zoo.

The AutoML study ("On the Security Risks of AutoML", Pang et al., USENIX Security 2022, Sec. 6,
Table 3) explains NAS models' vulnerability by their cells being wide and shallow, after Shu et
al., "Understanding Architectures Learnt by Cell-based Neural Architecture Search" (ICLR 2020,
Sec. 3). Its Table 3 (cell depth / cell width / skip connects): AmoebaNet 4/3c/2, DARTS 3/3c/3,
DrNAS 4/2c/1, ENAS 2/5c/2, NASNet 2/5c/1, PC-DARTS 2/4c/1, PDARTS 4/2c/2, SGAS 3/2c/1,
SNAS 2/4c/4. The definitions below, on the normal cell, are the ones that reproduce it:

* **depth** = the number of connections along the longest path from an input node (0 or 1) to
  the output node; the connection from a concatenated node to the output node counts as one.
  DARTS V2: 0 -> 2 -> 5 -> output = 3. Reproduces all 9 rows of Table 3 (not counting the
  output connection gives one less in every row; the reduction cell misses 6 of 9 rows, e.g.
  DrNAS 5, ENAS 4).
* **width** (in units of c, the channel width of one intermediate node) = the paper's "total
  width of intermediate nodes connected to the input nodes", read as: the number of
  intermediate nodes *fed only by the cell's input nodes* (both inputs from nodes 0/1).
  DARTS V2: nodes 2, 3, 4 -> 3c. Reproduces all 9 rows. (Shu et al.'s fractional count, where
  a node with one input from an intermediate node counts 1/2, gives DARTS 3.5c and AmoebaNet
  4c, not the table's 3c and 3c; it is kept as ``width_shu``.)
* **skip** = number of ``skip_connect`` ops in the normal cell. Reproduces 7 of 9 rows
  (AmoebaNet 2, DrNAS 1, ENAS 2, PC-DARTS 1, PDARTS 2, SGAS 1, SNAS 4); no single definition
  reproduces all 9. DARTS: the table's 3 is not DARTS V2's normal cell (2 skips; PROTOCOLS 1.3
  lists 2) but its reduction cell's count (3), or the normal cell of DARTS V1 (3 skips, whose
  depth 3 and width 3c also match the row). NASNet: the table's 1 is NASNet-A's reduction cell
  count; its normal cell has 2 identities (blocks 3 and 5, in the original paper and in every
  public transcription). Counting the reduction cell reproduces only DARTS, DrNAS and NASNet;
  both cells together only AmoebaNet, ENAS, PC-DARTS and PDARTS. The reduction cell's count is
  kept as ``skip_reduce``.

Deviations: none in the definitions; the two skip rows above are the paper's, not ours.
Variants and the artifact's random genotype under the same definitions: darts-i 5/1c/2,
darts-ii 3/3c/0, darts-iii 5/1c/0, random 4/1c/2.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ...registry import MODELS
from .genotypes import GENOTYPES, Genotype, get_genotype

#: The AutoML paper's Table 3: (cell depth, cell width in units of c, skip connects).
TABLE3: dict[str, tuple[int, int, int]] = {
    "amoebanet": (4, 3, 2), "darts": (3, 3, 3), "drnas": (4, 2, 1), "enas": (2, 5, 2),
    "nasnet": (2, 5, 1), "pc_darts": (2, 4, 1), "pdarts": (4, 2, 2), "sgas": (3, 2, 1),
    "snas": (2, 4, 4),
}


def cell_depth(genotype: Genotype, kind: str = "normal") -> int:
    """Connections on the longest input -> output path (see the module docstring)."""
    longest = [0, 0]  # edges from an input node to node k
    for (_, a), (_, b) in genotype.nodes(kind):
        longest.append(1 + max(longest[a], longest[b]))
    concat = genotype.normal_concat if kind == "normal" else genotype.reduce_concat
    return 1 + max(longest[k] for k in concat)


def cell_width(genotype: Genotype, kind: str = "normal") -> int:
    """Width in units of c: intermediate nodes fed only by the input nodes (Table 3's
    definition, see the module docstring)."""
    return sum(all(src < 2 for _, src in pair) for pair in genotype.nodes(kind))


def cell_width_shu(genotype: Genotype, kind: str = "normal") -> float:
    """Shu et al.'s fractional width: each intermediate node counts with the fraction of its
    inputs that come from the input nodes (DARTS V2: 3.5)."""
    return sum(sum(src < 2 for _, src in pair) / len(pair) for pair in genotype.nodes(kind))


def skip_count(genotype: Genotype, kind: str = "normal") -> int:
    """Number of ``skip_connect`` ops in the cell."""
    edges = genotype.normal if kind == "normal" else genotype.reduce
    return sum(op == "skip_connect" for op, _ in edges)


def genotype_stats(name: str) -> dict[str, Any]:
    """Depth, width (units of c) and skip count of the normal cell of genotype ``name`` (the
    AutoML paper's Table 3 definitions), plus Shu et al.'s fractional width and the reduction
    cell's skip count (see the module docstring)."""
    return stats_of(get_genotype(name), name)


def stats_of(g: Genotype, name: str = "") -> dict[str, Any]:
    """:func:`genotype_stats` of a genotype given as data (e.g. one a search found)."""
    return {"name": name, "depth": cell_depth(g), "width": cell_width(g), "skip": skip_count(g),
            "width_shu": cell_width_shu(g), "skip_reduce": skip_count(g, "reduce")}


def stats_table() -> list[dict[str, Any]]:
    """:func:`genotype_stats` of every NAS model and variant, with its MODELS family and the
    paper's Table 3 row (depth/width/skip, empty where the table has none)."""
    rows = []
    for name in GENOTYPES:
        row = genotype_stats(name)
        row["family"] = MODELS.meta(name)["family"] if name in MODELS else ""
        ref = TABLE3.get(name)
        row["table3"] = f"{ref[0]}/{ref[1]}c/{ref[2]}" if ref else ""
        rows.append(row)
    return rows


def _buildable(builder: Any) -> bool:
    """Whether ``builder`` needs nothing beyond ``num_classes`` and ``input_size``."""
    for p in inspect.signature(builder).parameters.values():
        if (p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name not in ("num_classes", "input_size")):
            return False
    return True


def model_table(num_classes: int = 10, input_size: int = 32, *,
                families: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Name, family, parameter count and source of every registered model (or those of
    ``families``). Models are built on the ``meta`` device, so nothing is allocated; a builder
    that needs arguments beyond ``num_classes``/``input_size`` (e.g. an architecture) gets
    ``params=None``."""
    rows = []
    for name in MODELS.names():
        meta = MODELS.meta(name)
        family = meta.get("family", "")
        if families is not None and family not in families:
            continue
        builder = MODELS.get(name)
        params: int | None = None
        if _buildable(builder):
            with torch.device("meta"):
                model = builder(num_classes=num_classes, input_size=input_size)
            params = sum(p.numel() for p in model.parameters())
        rows.append({"name": name, "family": family, "params": params,
                     "source": meta.get("source", "")})
    return rows
