"""The published DARTS-space genotypes of the AutoML study and its mitigation variants
(PROTOCOLS 1.3), as data.

A genotype lists, per cell type, two ``(op, input)`` pairs per intermediate node: pairs
``2k, 2k+1`` feed node ``k + 2``; nodes 0 and 1 are the outputs of the two previous cells.
The cell output concatenates the nodes in ``*_concat``. Most genotypes have 4 intermediate
nodes; NASNet, AmoebaNet and ENAS (found in larger spaces) have 5 and concatenate only the
nodes no other node consumes.

Sources (transcribed facts, names as the AutoML study's artifact uses them): the DARTS
authors' public genotype list (NASNet-A, AmoebaNet-A, DARTS V2), the methods' papers and
released genotypes (ENAS, SNAS "mild", P-DARTS, PC-DARTS CIFAR, SGAS, DrNAS CIFAR10), and
the genotype list of the study's artifact (TrojanZoo/autovul), which agrees with them; `random`
and the three variants are given in PROTOCOLS 1.3. The normal-cell skip counts match PROTOCOLS'
reference list (checked in tests/test_darts.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ...errors import UserError
from .ops import OPS

Edge = tuple[str, int]


@dataclass(frozen=True)
class Genotype:
    """A DARTS-space architecture: normal and reduction cell (PROTOCOLS 1.2)."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]
    source: str = ""

    def __post_init__(self) -> None:
        for kind in ("normal", "reduce"):
            edges = getattr(self, kind)
            concat = getattr(self, f"{kind}_concat")
            if not edges or len(edges) % 2:
                raise ValueError(f"{kind} cell needs two (op, input) pairs per node, got {len(edges)}")
            for i, (op, src) in enumerate(edges):
                node = i // 2 + 2
                if op not in OPS:
                    raise ValueError(f"{kind} cell: unknown op {op!r}")
                if not 0 <= src < node:
                    raise ValueError(f"{kind} cell: node {node} cannot take input {src}")
            n_nodes = len(edges) // 2 + 2
            if not concat or any(not 0 <= c < n_nodes for c in concat):
                raise ValueError(f"{kind}_concat {concat} out of range for {n_nodes} nodes")

    def nodes(self, kind: str = "normal") -> list[tuple[Edge, Edge]]:
        """The ``(op, input)`` pairs of each intermediate node, in order (node 2 first)."""
        edges = self.normal if kind == "normal" else self.reduce
        return [(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]


def _g(normal: list[Edge], normal_concat: list[int], reduce: list[Edge],
       reduce_concat: list[int], source: str) -> Genotype:
    return Genotype(tuple(normal), tuple(normal_concat), tuple(reduce), tuple(reduce_concat), source)


_R = [2, 3, 4, 5]  # the usual concat of a 4-node cell

# Zoph et al., "Learning Transferable Architectures for Scalable Image Recognition" (CVPR 2018),
# NASNet-A, as listed by the DARTS authors.
NASNET = _g(
    [("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 0), ("sep_conv_3x3", 0),
     ("avg_pool_3x3", 1), ("skip_connect", 0), ("avg_pool_3x3", 0), ("avg_pool_3x3", 0),
     ("sep_conv_3x3", 1), ("skip_connect", 1)],
    [2, 3, 4, 5, 6],
    [("sep_conv_5x5", 1), ("sep_conv_7x7", 0), ("max_pool_3x3", 1), ("sep_conv_7x7", 0),
     ("avg_pool_3x3", 1), ("sep_conv_5x5", 0), ("skip_connect", 3), ("avg_pool_3x3", 2),
     ("sep_conv_3x3", 2), ("max_pool_3x3", 1)],
    [4, 5, 6],
    "NASNet-A (Zoph et al., CVPR 2018), DARTS authors' genotype list",
)

# Real et al., "Regularized Evolution for Image Classifier Architecture Search" (AAAI 2019),
# AmoebaNet-A, as listed by the DARTS authors.
AMOEBANET = _g(
    [("avg_pool_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
     ("sep_conv_3x3", 0), ("avg_pool_3x3", 3), ("sep_conv_3x3", 1), ("skip_connect", 1),
     ("skip_connect", 0), ("avg_pool_3x3", 1)],
    [4, 5, 6],
    [("avg_pool_3x3", 0), ("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("sep_conv_7x7", 2),
     ("sep_conv_7x7", 0), ("avg_pool_3x3", 1), ("max_pool_3x3", 0), ("max_pool_3x3", 1),
     ("conv_7x1_1x7", 0), ("sep_conv_3x3", 5)],
    [3, 4, 6],
    "AmoebaNet-A (Real et al., AAAI 2019), DARTS authors' genotype list",
)

# Liu et al., "DARTS" (ICLR 2019), second-order run (DARTS V2); also in PROTOCOLS 1.3.
DARTS_V2 = _g(
    [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
     ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    _R,
    [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
     ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    _R,
    "DARTS V2 (Liu et al., ICLR 2019), DARTS authors' genotype list",
)

# Pham et al., "Efficient Neural Architecture Search via Parameter Sharing" (ICML 2018), Fig. 7
# (micro search space), in the 5-node form of the study's artifact. Its reduction cell leaves
# nodes 2, 3 and 6 unconsumed, hence the concat [2, 3, 6]. Less certain than the others: other
# public transcriptions order the reduce-cell pairs differently (same node inputs).
ENAS = _g(
    [("sep_conv_3x3", 1), ("skip_connect", 1), ("sep_conv_5x5", 1), ("skip_connect", 0),
     ("avg_pool_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("avg_pool_3x3", 1),
     ("sep_conv_5x5", 1), ("avg_pool_3x3", 0)],
    [2, 3, 4, 5, 6],
    [("sep_conv_5x5", 0), ("avg_pool_3x3", 1), ("sep_conv_3x3", 1), ("avg_pool_3x3", 1),
     ("sep_conv_3x3", 1), ("avg_pool_3x3", 1), ("sep_conv_5x5", 4), ("avg_pool_3x3", 1),
     ("sep_conv_3x3", 5), ("sep_conv_5x5", 0)],
    [2, 3, 6],
    "ENAS micro cell (Pham et al., ICML 2018, Fig. 7), as in the AutoML study's artifact",
)

# Xie et al., "SNAS: Stochastic Neural Architecture Search" (ICLR 2019), mild constraint (Fig. 3).
SNAS_MILD = _g(
    [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("dil_conv_3x3", 1),
     ("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 0), ("sep_conv_3x3", 1)],
    _R,
    [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
     ("max_pool_3x3", 1), ("skip_connect", 2), ("dil_conv_5x5", 2), ("max_pool_3x3", 0)],
    _R,
    "SNAS, mild constraint (Xie et al., ICLR 2019)",
)

# Chen et al., "Progressive Differentiable Architecture Search" (ICCV 2019), released genotype.
PDARTS = _g(
    [("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
     ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
    _R,
    [("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
     ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
    _R,
    "P-DARTS (Chen et al., ICCV 2019), released CIFAR genotype",
)

# Xu et al., "PC-DARTS: Partial Channel Connections" (ICLR 2020), CIFAR10 genotype.
PC_DARTS = _g(
    [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
     ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
    _R,
    [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
     ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
    _R,
    "PC-DARTS (Xu et al., ICLR 2020), CIFAR genotype",
)

# Li et al., "SGAS: Sequential Greedy Architecture Search" (CVPR 2020), CIFAR10 (criterion 1).
SGAS = _g(
    [("sep_conv_3x3", 0), ("dil_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
     ("sep_conv_5x5", 1), ("sep_conv_5x5", 3), ("skip_connect", 0), ("dil_conv_5x5", 2)],
    _R,
    [("max_pool_3x3", 0), ("dil_conv_5x5", 1), ("sep_conv_3x3", 0), ("skip_connect", 2),
     ("sep_conv_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0), ("max_pool_3x3", 1)],
    _R,
    "SGAS (Li et al., CVPR 2020), CIFAR10 genotype as in the AutoML study's artifact",
)

# Chen et al., "DrNAS: Dirichlet Neural Architecture Search" (ICLR 2021), CIFAR10 genotype.
DRNAS = _g(
    [("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2),
     ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("dil_conv_5x5", 3)],
    _R,
    [("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_5x5", 2), ("sep_conv_5x5", 1),
     ("sep_conv_5x5", 1), ("dil_conv_5x5", 3), ("skip_connect", 4), ("sep_conv_5x5", 1)],
    _R,
    "DrNAS (Chen et al., ICLR 2021), CIFAR10 genotype",
)

# The one fixed random genotype the study's artifact ships (PROTOCOLS 1.3).
RANDOM = _g(
    [("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("sep_conv_3x3", 2), ("skip_connect", 1),
     ("skip_connect", 3), ("avg_pool_3x3", 0), ("sep_conv_3x3", 1), ("dil_conv_3x3", 2)],
    _R,
    [("avg_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 1), ("dil_conv_3x3", 1),
     ("sep_conv_3x3", 3), ("dil_conv_3x3", 1), ("max_pool_3x3", 0), ("sep_conv_3x3", 4)],
    _R,
    "fixed random genotype of the AutoML study's artifact (PROTOCOLS 1.3)",
)

# Mitigation variants (PROTOCOLS 1.3): DARTS V2's reduction cell, normal cell changed.
DARTS_I = _g(
    [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("sep_conv_3x3", 2),
     ("sep_conv_3x3", 3), ("skip_connect", 3), ("skip_connect", 4), ("dil_conv_3x3", 4)],
    _R, list(DARTS_V2.reduce), _R,
    "darts-i (deep): DARTS V2's ops rewired into a chain (PROTOCOLS 1.3)",
)
DARTS_II = _g(
    [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
     ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("dil_conv_3x3", 0), ("dil_conv_3x3", 2)],
    _R, list(DARTS_V2.reduce), _R,
    "darts-ii (noskip): DARTS V2 with its normal-cell skips replaced (PROTOCOLS 1.3)",
)
DARTS_III = _g(
    [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("sep_conv_3x3", 2),
     ("sep_conv_3x3", 3), ("sep_conv_3x3", 3), ("dil_conv_3x3", 4), ("dil_conv_3x3", 4)],
    _R, list(DARTS_V2.reduce), _R,
    "darts-iii (deep_noskip): chain without skips (PROTOCOLS 1.3)",
)

# The 10 NAS models of the AutoML study, by the artifact's names.
NAS_GENOTYPES: Mapping[str, Genotype] = MappingProxyType({
    "amoebanet": AMOEBANET,
    "darts": DARTS_V2,
    "drnas": DRNAS,
    "enas": ENAS,
    "nasnet": NASNET,
    "pc_darts": PC_DARTS,
    "pdarts": PDARTS,
    "random": RANDOM,
    "sgas": SGAS,
    "snas": SNAS_MILD,
})
VARIANT_GENOTYPES: Mapping[str, Genotype] = MappingProxyType({
    "darts-i": DARTS_I,
    "darts-ii": DARTS_II,
    "darts-iii": DARTS_III,
})
GENOTYPES: Mapping[str, Genotype] = MappingProxyType({**NAS_GENOTYPES, **VARIANT_GENOTYPES})


def get_genotype(name: str) -> Genotype:
    """The genotype called ``name`` (a NAS model or a variant)."""
    try:
        return GENOTYPES[name]
    except KeyError:
        raise UserError(
            f"unknown genotype {name!r}; valid: {', '.join(sorted(GENOTYPES))}") from None


def format_genotype(g: Genotype) -> str:
    """``g`` in the DARTS code's printed form, ``Genotype(normal=[('sep_conv_3x3', 0), ...],
    normal_concat=[2, 3, 4, 5], reduce=[...], reduce_concat=[...])``: what a search logs and
    what :func:`parse_genotype` reads back (a lineage base built from a found genotype)."""
    def edges(es: tuple[Edge, ...]) -> str:
        return "[" + ", ".join(f"('{op}', {src})" for op, src in es) + "]"

    return (f"Genotype(normal={edges(g.normal)}, normal_concat={list(g.normal_concat)}, "
            f"reduce={edges(g.reduce)}, reduce_concat={list(g.reduce_concat)})")


def parse_genotype(text: str) -> Genotype:
    """The genotype a string in the DARTS code's printed form describes (the form
    :func:`format_genotype` writes; ``range(2, 6)`` is accepted for a concat, as the DARTS
    code prints it). Parsed with :func:`ast.literal_eval` on each field, never ``eval``; any
    malformed string raises ValueError naming the problem."""
    import ast
    import re

    m = re.fullmatch(r"\s*Genotype\((.*)\)\s*", text, flags=re.S)
    if not m:
        raise ValueError(f"a genotype string starts with 'Genotype(': got {text[:60]!r}")
    fields: dict[str, object] = {}
    # split "name=value, name=value" at the top level: the values hold commas inside [] / ()
    parts, depth, start, body = [], 0, 0, m.group(1)
    for i, ch in enumerate(body):
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    for part in (p.strip() for p in parts if p.strip()):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in ("normal", "normal_concat", "reduce", "reduce_concat"):
            raise ValueError(f"genotype field {name!r} is not one of normal, normal_concat, "
                             "reduce, reduce_concat")
        value = value.strip()
        r = re.fullmatch(r"range\((\d+),\s*(\d+)\)", value)
        try:
            fields[name] = list(range(int(r[1]), int(r[2]))) if r else ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"genotype field {name}: not a literal list ({e})") from None
    missing = {"normal", "normal_concat", "reduce", "reduce_concat"} - set(fields)
    if missing:
        raise ValueError(f"genotype string lacks {', '.join(sorted(missing))}")
    try:
        return Genotype(
            normal=tuple((str(op), int(src)) for op, src in fields["normal"]),  # type: ignore[union-attr]
            normal_concat=tuple(int(c) for c in fields["normal_concat"]),  # type: ignore[union-attr]
            reduce=tuple((str(op), int(src)) for op, src in fields["reduce"]),  # type: ignore[union-attr]
            reduce_concat=tuple(int(c) for c in fields["reduce_concat"]),  # type: ignore[union-attr]
            source="parsed",
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed genotype: {e}") from None
