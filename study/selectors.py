"""Selectors of derived stages: which finished trials of an earlier stage (or which rows of an
artifact each of them logged) become the cases of a later stage.

A derived stage says ``from: STAGE``, ``select: {selector: NAME, ...}`` and ``take: {field:
path}`` (:mod:`nasrisk.study.spec`). When STAGE is done, the runner turns its finished runs into
**items**, plain dicts in plan order::

    {"key": trial key, "run_id": MLflow run id, "name": run name, "index": plan position,
     "config": the validated config, "metrics": {name: float}}

plus, when the selector reads an artifact (``artifact: trajectory.json``, a JSON list of row
dicts each source run logged), one item per row with ``"row": {...}`` and ``"row_index"``.
The selector picks items; each picked item becomes one case of the derived stage. A selector
never touches MLflow (the runner builds the items), so it is a pure function of its items and
its config, and a resumed study selects the same cases.

A :class:`Selector` entry of :data:`SELECTORS` takes its typed config (``config_model``) and
gives ``select(items, cfg) -> items``, ``max_trials(n_source_trials, cfg) -> int | None`` (the
most items it can pick from that many source trials; None when that depends on artifacts not
written yet) and ``artifact(cfg)`` (the artifact the runner must fetch, or None).

Paths into an item (``take`` values, a selector's ``metric``): ``key``, ``run_id``, ``name``,
``index``, ``config.<dotted field>``, ``metrics.<name>``, ``row.<dotted field>``; a bare metric
name means ``metrics.<name>``. Ranking selectors put an item whose value is missing or not
finite (inf / nan: a flagged kappa is +inf) last, whether ``mode`` is min or max, and break
ties by plan order (then row order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nasrisk.trials.registry import Registry

Item = dict[str, Any]

#: item fields a path may name directly, and the roots of dotted paths
PLAIN_FIELDS = ("key", "run_id", "name", "index")
ROOTS = ("config", "metrics", "row")


class MissingValue(LookupError):
    """An item has no value at a path (a run that did not log the metric, a row without the
    field); the message names the path."""


def split_path(path: str) -> tuple[str, list[str]]:
    """``"config.victim.arch"`` -> ``("config", ["victim", "arch"])``; ValueError when the path
    is not one of the forms in the module docstring. A metric name keeps its dots."""
    if path in PLAIN_FIELDS:
        return path, []
    root, _, rest = path.partition(".")
    if root not in ROOTS or not rest:
        raise ValueError(f"{path!r} is not a path into a selected item (one of "
                         f"{', '.join(PLAIN_FIELDS)}, config.FIELD, metrics.NAME, row.FIELD)")
    parts = [rest] if root == "metrics" else rest.split(".")
    if any(not p for p in parts):
        raise ValueError(f"{path!r} has an empty field name")
    return root, parts


def item_value(item: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` in ``item`` (:class:`MissingValue` when there is none)."""
    root, parts = split_path(path)
    if not parts:
        return item[root]
    node: Any = item.get(root)
    for p in parts:
        if not isinstance(node, Mapping) or p not in node:
            raise MissingValue(f"no {path}")
        node = node[p]
    return node


def metric_path(metric: str) -> str:
    """A selector's ``metric``: a bare name is a metric of the source run."""
    return metric if metric.partition(".")[0] in ROOTS else f"metrics.{metric}"


def _number(item: Item, path: str) -> float | None:
    """The finite number at ``path``, or None (missing, not a number, inf, nan)."""
    try:
        v = item_value(item, path)
    except MissingValue:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def rank(items: list[Item], path: str, mode: Literal["min", "max"]) -> list[Item]:
    """``items`` best first by the number at ``path``: ties keep plan order; a missing or
    non-finite value (a flagged kappa is +inf) ranks last whatever the mode."""
    def key(pair: tuple[int, Item]) -> tuple[int, float, int]:
        i, it = pair
        v = _number(it, path)
        if v is None:
            return (1, 0.0, i)
        return (0, -v if mode == "max" else v, i)
    return [it for _, it in sorted(enumerate(items), key=key)]


def by_run(items: list[Item]) -> list[list[Item]]:
    """Items grouped by source trial (``key``), groups and members in plan order."""
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it["key"], []).append(it)
    return list(groups.values())


# -- configs -----------------------------------------------------------------------------------
class FromArtifact(BaseModel):
    """Fields every selector has. ``artifact``: items are the rows of this JSON file (a list
    of dicts) each source run logged, instead of the source trials themselves. ``where``:
    keep only the items whose value at each path equals the given one (``{config.method:
    evolution}``) before selecting."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    artifact: str | None = Field(None, min_length=1)
    where: dict[str, str | int | float | bool] = {}

    @field_validator("where")
    @classmethod
    def _where_paths(cls, v: dict[str, Any]) -> dict[str, Any]:
        for path in v:
            split_path(path)  # raises ValueError on a malformed path
        return v

    @field_validator("artifact")
    @classmethod
    def _inside_the_run(cls, v: str | None) -> str | None:
        if v is not None and (v.startswith("/") or ".." in v.split("/") or "\\" in v):
            raise ValueError(f"artifact {v!r} must be a path inside the run's artifacts")
        return v


def _check_metric(cfg: Any) -> Any:
    split_path(metric_path(cfg.metric))  # raises ValueError on a malformed path
    if metric_path(cfg.metric).startswith("row.") and cfg.artifact is None:
        raise ValueError(f"metric {cfg.metric!r} reads artifact rows: set artifact")
    return cfg


class Ranked(FromArtifact):
    """``metric``: a metric name of the source kind (or ``row.FIELD`` with ``artifact``);
    ``mode``: whether ``min`` or ``max`` is best; ``per_run``: pick from each source run's
    items separately (the best row of each search) instead of from all of them."""

    metric: str = Field(min_length=1)
    mode: Literal["min", "max"]
    per_run: bool = False
    _metric = model_validator(mode="after")(_check_metric)


class TopK(FromArtifact):
    """:class:`Ranked` with ``k``, listed first (as ``nasrisk plan`` shows it)."""

    k: int = Field(ge=1, le=100_000)
    metric: str = Field(min_length=1)
    mode: Literal["min", "max"]
    per_run: bool = False
    _metric = model_validator(mode="after")(_check_metric)


class EveryKth(FromArtifact):
    k: int = Field(ge=1, le=100_000)


# -- the registry ------------------------------------------------------------------------------
def _artifact_field(cfg: Any) -> str | None:
    return getattr(cfg, "artifact", None)


def _reads_where(cfg: Any) -> tuple[str, ...]:
    return tuple(getattr(cfg, "where", {}))


def matching(items: list[Item], cfg: Any) -> list[Item]:
    """The items that satisfy ``cfg.where`` (all of them when it is empty)."""
    where = getattr(cfg, "where", {})

    def ok(it: Item) -> bool:
        try:
            return all(item_value(it, p) == v for p, v in where.items())
        except MissingValue:
            return False
    return [it for it in items if ok(it)] if where else items


@dataclass(frozen=True)
class Selector:
    """One selector (see the module docstring). ``reads``: the item paths it ranks by (checked
    at plan time against the source kind's metrics); ``example``: a small valid config (docs and
    the registry sweep); ``rows``: whether the items it returns carry ``row`` (by default when
    it reads an artifact; a selector that makes new items from the source's, such as the
    neighbours of an arch, says so here)."""

    config_model: type[BaseModel]
    select: Callable[[list[Item], Any], list[Item]]
    max_trials: Callable[[int | None, Any], int | None]
    description: str
    example: Mapping[str, Any] = field(default_factory=dict)
    artifact: Callable[[Any], str | None] = _artifact_field
    reads: Callable[[Any], tuple[str, ...]] = _reads_where
    rows: Callable[[Any], bool] = lambda cfg: _artifact_field(cfg) is not None

    def validate(self, fields: Mapping[str, Any]) -> BaseModel:
        return self.config_model.model_validate(dict(fields))


#: selector name -> :class:`Selector` (registered below, at import; no modules to load)
SELECTORS: Registry[Selector] = Registry("selector")


def _reads_metric(cfg: Ranked) -> tuple[str, ...]:
    return (metric_path(cfg.metric), *_reads_where(cfg))


def _best(items: list[Item], cfg: Ranked) -> list[Item]:
    items = matching(items, cfg)
    groups = by_run(items) if cfg.per_run else [items]
    return [rank(g, metric_path(cfg.metric), cfg.mode)[0] for g in groups if g]


def _best_max(n: int | None, cfg: Ranked) -> int | None:
    if cfg.per_run:
        return n
    return 1 if n is None else min(1, n)


SELECTORS.register("best", Selector(
    config_model=Ranked, select=_best, max_trials=_best_max, reads=_reads_metric,
    example={"metric": "value", "mode": "max"},
    description="the item with the best metric (min or max; ties: plan order; inf/nan last); "
                "per_run: the best of each source run"))


def _top_k(items: list[Item], cfg: TopK) -> list[Item]:
    items = matching(items, cfg)
    groups = by_run(items) if cfg.per_run else [items]
    return [it for g in groups for it in rank(g, metric_path(cfg.metric), cfg.mode)[:cfg.k]]


def _top_k_max(n: int | None, cfg: TopK) -> int | None:
    if cfg.per_run:
        per = cfg.k if cfg.artifact is not None else 1  # a run without rows is one item
        return None if n is None else n * per
    if cfg.artifact is not None or n is None:
        return cfg.k
    return min(cfg.k, n)


SELECTORS.register("top_k", Selector(
    config_model=TopK, select=_top_k, max_trials=_top_k_max, reads=_reads_metric,
    example={"k": 2, "metric": "value", "mode": "max"},
    description="the k items with the best metric, best first (ties: plan order; inf/nan "
                "last); per_run: k of each source run"))


def _every_kth(items: list[Item], cfg: EveryKth) -> list[Item]:
    items = matching(items, cfg)
    groups = by_run(items) if cfg.artifact is not None else [items]
    return [it for g in groups for it in g[::cfg.k]]


def _every_kth_max(n: int | None, cfg: EveryKth) -> int | None:
    if cfg.artifact is not None or n is None:
        return None  # rows per run are known once the source has run
    return math.ceil(n / cfg.k)


SELECTORS.register("every_kth", Selector(
    config_model=EveryKth, select=_every_kth, max_trials=_every_kth_max,
    example={"k": 2},
    description="items 0, k, 2k, ... : of each source run's artifact rows (a search "
                "trajectory), or of the source trials in plan order"))


def _each(items: list[Item], cfg: FromArtifact) -> list[Item]:
    return list(matching(items, cfg))


def _each_max(n: int | None, cfg: FromArtifact) -> int | None:
    return None if cfg.artifact is not None else n


SELECTORS.register("each_result", Selector(
    config_model=FromArtifact, select=_each, max_trials=_each_max,
    description="every finished source trial (or every artifact row of each)"))


class Neighbours(FromArtifact):
    """The landscape around an arch (EVAS, ICLR 2023, Figure 5 / Table 8): ``arch`` (a fixed
    arch string) or the arch at ``arch_path`` of each item; ``edges``: the two edges (indices
    0..5 in arch-string order) whose ops are replaced by every pair of the 5 ops (25 archs,
    the arch itself among them); ``conv``: also every conv1x1/conv3x3 assignment of the
    arch's conv edges (2^k archs for k conv edges)."""

    arch: str | None = None
    arch_path: str = "config.model.model_kwargs.arch"
    edges: tuple[int, int] = (0, 1)
    conv: bool = True

    @model_validator(mode="after")
    def _fields(self) -> Neighbours:
        # nats_space imports no torch: `nasrisk studies` validates this too
        from nasrisk.trials.nats_space import parse_arch

        if self.arch is not None:
            parse_arch(self.arch)
        split_path(self.arch_path)
        if len(set(self.edges)) != 2 or not all(0 <= e < 6 for e in self.edges):
            raise ValueError(f"edges must be two different edges in 0..5, got {self.edges}")
        return self


def neighbour_archs(arch: str, edges: tuple[int, int], conv: bool) -> list[tuple[str, str]]:
    """``(arch string, group)`` of the landscape around ``arch`` (:class:`Neighbours`), first
    the 25 two-edge archs (``edges``), then the conv assignments (``conv``), duplicates
    dropped (first kept)."""
    import itertools

    from nasrisk.trials.nats_space import OPS, format_arch, parse_arch

    ops = list(parse_arch(arch))
    out: dict[str, str] = {}
    a, b = edges
    for oa, ob in itertools.product(OPS, OPS):
        new = list(ops)
        new[a], new[b] = oa, ob
        out.setdefault(format_arch(new), "edges")
    if conv:
        convs = [i for i, op in enumerate(ops) if op in ("nor_conv_1x1", "nor_conv_3x3")]
        for choice in itertools.product(("nor_conv_1x1", "nor_conv_3x3"), repeat=len(convs)):
            new = list(ops)
            for i, op in zip(convs, choice, strict=True):
                new[i] = op
            out.setdefault(format_arch(new), "conv")
    return list(out.items())


def _neighbours(items: list[Item], cfg: Neighbours) -> list[Item]:
    seen: set[str] = set()
    picked: list[Item] = []
    for it in matching(items, cfg):
        try:
            center = cfg.arch if cfg.arch is not None else item_value(it, cfg.arch_path)
        except MissingValue:
            continue
        for arch, group in neighbour_archs(str(center), cfg.edges, cfg.conv):
            if arch in seen:
                continue
            seen.add(arch)
            picked.append({**it, "row": {"arch": arch, "group": group, "center": center},
                           "row_index": len(picked)})
    return picked


def _neighbours_max(n: int | None, cfg: Neighbours) -> int | None:
    per = 25 + (2 ** 6 if cfg.conv else 0)
    if cfg.arch is not None:
        return per
    return None if n is None else n * per


SELECTORS.register("neighbours", Selector(
    config_model=Neighbours, select=_neighbours, max_trials=_neighbours_max,
    rows=lambda cfg: True,
    example={"arch": "|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|"
                     "nor_conv_3x3~1|avg_pool_3x3~2|"},
    description="the landscape around an arch (EVAS Figure 5): every pair of ops on two "
                "edges (25 archs) and every conv1x1/conv3x3 assignment of its conv edges; "
                "row.arch, row.group, row.center (each arch once)"))
