"""Architecture statistics of genotypes (PROTOCOLS 1.3) and the model table of the zoo.

The AutoML study ("On the Security Risks of AutoML", Pang et al., USENIX Security 2022, Sec. 6)
explains NAS models' vulnerability by their cells being wide and shallow, with the definitions
of Shu et al., "Understanding Architectures Learnt by Cell-based Neural Architecture Search"
(ICLR 2020, Sec. 3), applied to the normal cell:

* **depth** = the number of connections along the longest path from an input node (0 or 1) to
  the output node; the connection from a concatenated node to the output node counts as one.
  DARTS V2: 0 -> 2 -> 5 -> output = 3.
* **width** (in units of c, the channel width of one intermediate node) = the total width of
  the intermediate nodes connected to the input nodes, where a node that also takes inputs from
  other intermediate nodes counts only with the fraction of its inputs that come from the input
  nodes. DARTS V2: nodes 2, 3, 4 take both inputs from input nodes, node 5 one of two -> 3.5.
* **skip** = number of ``skip_connect`` ops.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ...registry import MODELS
from .genotypes import GENOTYPES, Genotype, get_genotype


def cell_depth(genotype: Genotype, kind: str = "normal") -> int:
    """Connections on the longest input -> output path (see the module docstring)."""
    longest = [0, 0]  # edges from an input node to node k
    for (_, a), (_, b) in genotype.nodes(kind):
        longest.append(1 + max(longest[a], longest[b]))
    concat = genotype.normal_concat if kind == "normal" else genotype.reduce_concat
    return 1 + max(longest[k] for k in concat)


def cell_width(genotype: Genotype, kind: str = "normal") -> float:
    """Width in units of c (Shu et al.'s definition, see the module docstring)."""
    width = 0.0
    for pair in genotype.nodes(kind):
        width += sum(src < 2 for _, src in pair) / len(pair)
    return width


def skip_count(genotype: Genotype, kind: str = "normal") -> int:
    """Number of ``skip_connect`` ops in the cell."""
    edges = genotype.normal if kind == "normal" else genotype.reduce
    return sum(op == "skip_connect" for op, _ in edges)


def genotype_stats(name: str) -> dict[str, Any]:
    """Depth, width (units of c) and skip count of the normal cell of genotype ``name``."""
    g = get_genotype(name)
    return {"name": name, "depth": cell_depth(g), "width": cell_width(g), "skip": skip_count(g)}


def stats_table() -> list[dict[str, Any]]:
    """:func:`genotype_stats` of every NAS model and variant, with its MODELS family."""
    rows = []
    for name in GENOTYPES:
        row = genotype_stats(name)
        row["family"] = MODELS.meta(name)["family"] if name in MODELS else ""
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
