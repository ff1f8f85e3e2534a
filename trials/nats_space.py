"""NATS-Bench topology space (NAS-Bench-201) arch strings (PROTOCOLS 1.1).

An arch is 6 ops, one per edge of a 4-node cell DAG, written in the community's byte-exact
format ``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|``: group ``k`` lists the edges into node
``k + 1`` and ``op~i`` is the op on the edge from node ``i``. Archs are identified by their
string.

NATS-Bench's own *index* order comes from its benchmark files and is not the product order of
:func:`all_archs`, so this module maps no indices to strings (that needs the benchmark files).
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Sequence
from typing import Literal

from .errors import UserError

OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
"""The 5 candidate ops of an edge."""

EDGES: tuple[tuple[int, int], ...] = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
"""The 6 edges as ``(to_node, from_node)``, in arch-string order."""

NUM_NODES = 4

# PROTOCOLS 5: the op an evolution mutation draws, weighted (the current op is excluded).
MUTATION_WEIGHTS: dict[str, int] = {
    "none": 1, "skip_connect": 2, "nor_conv_1x1": 3, "nor_conv_3x3": 3, "avg_pool_3x3": 1,
}

_ZERO = "#"  # NAS-Bench-201's zero symbol in isomorphism keys


class ArchStringError(UserError):
    """A malformed NATS-Bench arch string; the message says what is wrong."""


def parse_arch(s: str) -> tuple[str, ...]:
    """The 6 ops of an arch string, in string (= :data:`EDGES`) order.

    Raises :class:`ArchStringError` naming the problem (group count, bars, unknown op, source
    index) for anything that is not exactly the community format.
    """
    if not isinstance(s, str):
        raise ArchStringError(f"an arch string must be a str, got {type(s).__name__}")
    groups = s.split("+")
    if len(groups) != NUM_NODES - 1:
        raise ArchStringError(
            f"arch string {s!r} has {len(groups)} '+'-separated groups, expected {NUM_NODES - 1}")
    ops: list[str] = []
    for k, group in enumerate(groups):
        if len(group) < 2 or not group.startswith("|") or not group.endswith("|"):
            raise ArchStringError(
                f"arch string {s!r}: group {k + 1} {group!r} must start and end with '|'")
        tokens = group[1:-1].split("|")
        if len(tokens) != k + 1:
            raise ArchStringError(
                f"arch string {s!r}: group {k + 1} has {len(tokens)} edges, expected {k + 1}")
        for i, token in enumerate(tokens):
            op, sep, src = token.partition("~")
            if not sep:
                raise ArchStringError(f"arch string {s!r}: edge {token!r} lacks '~source'")
            if op not in OPS:
                raise ArchStringError(
                    f"arch string {s!r}: unknown op {op!r}; valid: {', '.join(OPS)}")
            if src != str(i):
                raise ArchStringError(
                    f"arch string {s!r}: edge {token!r} in group {k + 1} must come from node {i}")
            ops.append(op)
    return tuple(ops)


def format_arch(ops: Sequence[str]) -> str:
    """The byte-exact arch string of 6 ops given in :data:`EDGES` order."""
    ops = tuple(ops)
    if len(ops) != len(EDGES):
        raise ArchStringError(f"an arch has {len(EDGES)} ops, got {len(ops)}")
    for op in ops:
        if op not in OPS:
            raise ArchStringError(f"unknown op {op!r}; valid: {', '.join(OPS)}")
    groups, e = [], 0
    for node in range(1, NUM_NODES):
        groups.append("|" + "|".join(f"{ops[e + i]}~{i}" for i in range(node)) + "|")
        e += node
    return "+".join(groups)


@functools.cache
def _all_archs() -> tuple[str, ...]:
    return tuple(format_arch(ops) for ops in itertools.product(OPS, repeat=len(EDGES)))


def all_archs() -> list[str]:
    """All 5^6 = 15,625 arch strings, in product order over :data:`OPS` for the 6 edges (the
    last edge varies fastest). Not NATS-Bench's index order."""
    return list(_all_archs())


def op_counts(s: str) -> dict[str, int]:
    """How many edges carry each op (every op of :data:`OPS` is a key)."""
    ops = parse_arch(s)
    return {op: ops.count(op) for op in OPS}


def isomorphism_key(s: str, *, zeros: Literal["published", "all"] = "published") -> str:
    """A string equal for two archs exactly when they are isomorphic (PROTOCOLS 1.1).

    NAS-Bench-201 (Dong & Yang, ICLR 2020), its ``to_unique_str(consider_zero=True)``
    definition: node 0 is ``0``; an edge contributes ``#`` (zero) if its op is ``none`` or its
    source node is zero, its source's expression if the op is ``skip_connect``, else
    ``(source)@op``; a node is its contributions sorted and joined by ``+``. A node is zero only
    when its expression is the single symbol ``#``, so a two-input node whose inputs are both
    zero stays ``#+#`` (the published quirk). This gives 6,466 classes.

    ``zeros="all"`` instead treats every node whose contributions are all zero as zero (6,285
    classes: closer to functional equivalence, but not what the benchmark and papers used).
    """
    ops = parse_arch(s)
    nodes = ["0"]
    e = 0
    for node in range(1, NUM_NODES):
        parts = []
        for src in range(node):
            op, expr = ops[e], nodes[src]
            e += 1
            if op == "none" or expr == _ZERO:
                parts.append(_ZERO)
            elif op == "skip_connect":
                parts.append(expr)
            else:
                parts.append(f"({expr})@{op}")
        if zeros == "all" and all(p == _ZERO for p in parts):
            nodes.append(_ZERO)
        else:
            nodes.append("+".join(sorted(parts)))
    return nodes[-1]


@functools.cache
def _unique_archs() -> tuple[str, ...]:
    seen: set[str] = set()
    reps = []
    for s in _all_archs():
        key = isomorphism_key(s)
        if key not in seen:
            seen.add(key)
            reps.append(s)
    return tuple(reps)


def unique_archs() -> list[str]:
    """One arch per isomorphism class (6,466), the first of each class in :func:`all_archs`
    order."""
    return list(_unique_archs())


def sample_archs(n: int, *, seed: int,
                 distinct: Literal["isomorphism", "string"] = "isomorphism") -> list[str]:
    """``n`` distinct random archs drawn uniformly from all 15,625 strings, reproducible under
    ``seed``.

    ``distinct="isomorphism"`` walks a seeded random permutation of all strings and keeps an
    arch only if its isomorphism class is new, so a class is drawn with probability in
    proportion to its size (as a random arch string would be) and at most 6,466 can be drawn;
    ``"string"`` only asks for distinct strings (at most 15,625).

    Deviations: EVAS's correlation study (PROTOCOLS 5) sampled by NATS-Bench index; without
    the benchmark files we sample strings, which is the same distribution over the space.
    """
    if distinct not in ("isomorphism", "string"):
        raise UserError(f"distinct must be 'isomorphism' or 'string', got {distinct!r}")
    limit = len(_unique_archs()) if distinct == "isomorphism" else len(_all_archs())
    if not 0 <= n <= limit:
        raise UserError(
            f"cannot sample {n} archs distinct by {distinct}: the NATS topology space has "
            f"{limit} (and n must be >= 0)")
    order = list(_all_archs())
    random.Random(seed).shuffle(order)
    if distinct == "string":
        return order[:n]
    seen: set[str] = set()
    out: list[str] = []
    for s in order:
        if len(out) == n:
            break
        key = isomorphism_key(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def mutate(arch: str, rng: random.Random) -> str:
    """Replace the op on one uniformly chosen edge by a different op drawn with
    :data:`MUTATION_WEIGHTS` (PROTOCOLS 5: none 1, skip 2, conv1x1 3, conv3x3 3, avg_pool 1;
    never the same op), as EVAS's regularised-evolution search does."""
    ops = list(parse_arch(arch))
    edge = rng.randrange(len(EDGES))
    choices = [op for op in OPS if op != ops[edge]]
    ops[edge] = rng.choices(choices, weights=[MUTATION_WEIGHTS[op] for op in choices])[0]
    return format_arch(ops)
