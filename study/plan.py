"""Trial expansion: (spec, profile, command-line options) -> the validated trials of each
stage, each with a deterministic key (a hash of its study, stage, kind and full config) that
names it in Ray Tune, in MLflow and in the stores. Nothing here runs a trial.

A derived stage (``from: STAGE``) has no trials when planned: its :class:`StagePlan` holds a
:class:`Derivation` (the selector, what to take from each selected item, an upper bound on
its trials), checked here against the source stage's kind (its config fields and declared
metric names) before Ray starts; :func:`derive_trials` expands it once the source is done.

Beyond each trial kind's own config model, every planned config is checked for values no
trial can run with: non-finite floats, integers past :data:`MAX_INT` (seeds: outside
``[0, 2**32)``, what torch and numpy both take), victims whose ``model_kwargs`` do not build a
network, and studies of more than :data:`MAX_TRIALS` trials (counted before any is expanded).
"""

from __future__ import annotations

import collections.abc
import copy
import hashlib
import itertools
import json
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

import nasrisk.trials  # noqa: F401  (registers every entry)
from nasrisk.trials.errors import UserError
from nasrisk.trials.registry import DATASETS, TRIAL_KINDS

from .selectors import SELECTORS, MissingValue, Selector, item_value, split_path
from .spec import (
    Resources,
    StageOverride,
    StageSpec,
    StudySpec,
    deep_merge,
    format_validation_error,
)

#: trials one study may plan (all 15,625 NATS archs x a few settings fit; a typo'd grid of
#: 2,000 x 2,000 values does not, and would take minutes just to be listed)
MAX_TRIALS = 100_000
#: the largest integer a config field may hold (sizes, counts, epochs: C's int, what torch
#: shapes and loops take); seeds have their own range
MAX_INT = 2**31 - 1
#: NATS-Bench topology archs up to isomorphism (len(unique_archs()), without importing torch)
N_UNIQUE = 6_466
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class RunOptions:
    """What the command line may override (None: the profile's value)."""

    profile: str | None = None
    dataset: str | None = None
    num_archs: int | None = None
    all_archs: bool = False
    #: one arch per isomorphism class (6,466 of the 15,625 strings): with --all, the arch list;
    #: for kinds with a ``unique`` field (the kappa atlas), that field
    unique: bool = False
    seed: int | None = None
    params: str | None = None
    #: mixed precision of every trial's training ("off" / "bf16"; None: the study's, off)
    amp: str | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_failures: int = 2

    #: seconds to wait for the cluster to offer a trial's resources (an autoscaling cluster
    #: adds nodes); 0: refuse at once when no node can hold one trial; None: 0 for a local
    #: instance, 600 for a cluster (study/probes.py check_trial_resources)
    resource_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.num_archs is not None and not 1 <= self.num_archs <= MAX_TRIALS:
            raise UserError(f"--num-archs must be between 1 and {MAX_TRIALS:,} "
                            f"(got {self.num_archs})")
        if not 0 <= self.max_failures <= 1000:
            raise UserError(f"--max-failures must be between 0 and 1000 (got {self.max_failures})")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise UserError(f"--seed must be in [0, 2**32) (got {self.seed})")
        for flag, v, top in (("--cpus-per-trial", self.cpus_per_trial, 1024),
                             ("--gpus-per-trial", self.gpus_per_trial, 64),
                             ("--resource-timeout", self.resource_timeout, 7 * 86400)):
            if v is not None and not (math.isfinite(v) and 0 <= v <= top):
                raise UserError(f"{flag} must be a number between 0 and {top} (got {v})")
        if self.cpus_per_trial == 0:
            raise UserError("--cpus-per-trial must be > 0")
        if self.params not in (None, "paper", "artifact"):
            raise UserError(f"--params must be paper or artifact (got {self.params!r})")
        if self.amp not in (None, "off", "bf16"):
            raise UserError(f"--amp must be off or bf16 (got {self.amp!r})")


@dataclass(frozen=True)
class Trial:
    key: str
    name: str
    stage: str
    kind: str
    config: dict[str, Any]
    #: a derived trial: the MLflow run of the source trial it was selected from
    source_run_id: str | None = None


@dataclass(frozen=True)
class Derivation:
    """How a derived stage gets its trials once its source stage is done: each item the
    selector picks becomes the case ``{target: item value at path}`` of ``take``, crossed with
    ``grid``. Profile and command-line values (``inject``: dataset, seed, ...) are set before
    the taken ones, so a value taken from the selected trial is kept as it was there."""

    source: str
    selector: str
    select: BaseModel  # the selector's validated config
    take: dict[str, str]
    #: at most this many trials (selector bound x grid points); None: known once the source
    #: stage has written the artifacts the selector reads
    upper: int | None
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    inject: dict[str, Any]

    def describe(self) -> str:
        """``top_k (k=2, metric=value, mode=max); take index <- config.index``"""
        fields = ", ".join(f"{k}={v}" for k, v in
                           self.select.model_dump(exclude_defaults=True).items())
        take = ", ".join(f"{t} <- {src}" for t, src in self.take.items()) or "nothing"
        return f"{self.selector} ({fields}); take {take}"


@dataclass
class StagePlan:
    spec: StageSpec
    resources: Resources
    trials: list[Trial] = field(default_factory=list)
    #: set for a derived stage, whose ``trials`` are filled in when its source is done
    derived: Derivation | None = None


@dataclass
class StudyPlan:
    spec: StudySpec
    profile: str
    params: str
    options: RunOptions
    stages: list[StagePlan]

    @property
    def n_trials(self) -> int:
        return sum(len(s.trials) for s in self.stages)

    @property
    def n_derived(self) -> int | None:
        """The most trials the derived stages may add (None: not known before they run)."""
        bounds = [s.derived.upper for s in self.stages if s.derived is not None]
        return None if None in bounds else sum(b for b in bounds if b is not None)

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.spec.name == name)


def trial_key(study: str, stage: str, kind: str, config: dict[str, Any]) -> str:
    blob = json.dumps({"study": study, "stage": stage, "kind": kind, "config": config},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            inside = ".".join(parts[:i + 1])
            raise UserError(f"{where}: grid.{dotted} sets a field inside {inside}, which is "
                            f"{node!r}, not a mapping")
    node[parts[-1]] = value


def _check_grid_keys(grid: dict[str, list[Any]], where: str, what: str = "grid key") -> None:
    for a in grid:
        if not a or any(not part for part in a.split(".")):
            raise UserError(f"{where}: {what} {a!r} is not a field name (or a dotted path)")
        for b in grid:
            if b.startswith(a + "."):
                raise UserError(f"{where}: {what}s {a!r} and {b!r} overlap (one sets a "
                                "field inside the other)")


def check_numbers(value: Any, where: str, path: str = "") -> None:
    """Refuse values no trial can run with anywhere inside a validated config: non-finite
    floats, integers past :data:`MAX_INT`, seeds outside ``[0, 2**32)``."""
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            check_numbers(getattr(value, name), where, f"{path}.{name}" if path else name)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            check_numbers(v, where, f"{path}.{k}" if path else str(k))
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_numbers(v, where, f"{path}.{i}")
        return
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: {path}: must be a finite number (got {value})")
    if isinstance(value, int):
        if path.rsplit(".", 1)[-1].endswith("seed"):
            if not 0 <= value < SEED_LIMIT:
                raise UserError(f"{where}: {path}: a seed must be in [0, 2**32) (got {value})")
        elif abs(value) > MAX_INT:
            raise UserError(f"{where}: {path}: {value} is past what a trial can run with "
                            f"(at most {MAX_INT:,})")


def _inject(cfg: dict[str, Any], model: type, values: dict[str, Any]) -> None:
    """Set profile/command-line values (dataset, seed, parameter set) on every config level
    that has such a field: the top level and nested configs (e.g. an attack's ``victim``)."""
    from pydantic import BaseModel

    for name, value in values.items():
        if value is not None and name in model.model_fields:
            cfg[name] = value
    for fname, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(cfg.get(fname), dict):
            _inject(cfg[fname], sub, values)


def _archs(stage: StageSpec, opts: RunOptions, n_profile: int | None) -> list[str]:
    from nasrisk.trials.models.nats.arch_string import all_archs, sample_archs, unique_archs

    s = stage.archs
    assert s is not None
    if opts.all_archs or s.all:
        return unique_archs() if opts.unique else all_archs()
    n = opts.num_archs or n_profile or s.count
    return sample_archs(n, seed=s.seed, distinct=s.distinct)


def _dry_build_victims(valid: BaseModel, where: str, built: set[str]) -> None:
    """Build each victim that sets ``model_kwargs`` on the meta device (no memory, no
    compute), so kwargs that cannot make a network (``C: -8``) fail here, not in every trial."""
    import torch

    from nasrisk.trials.victims import VictimSpec, build_victim

    specs = [valid] if isinstance(valid, VictimSpec) else [
        getattr(valid, f) for f in type(valid).model_fields
        if isinstance(getattr(valid, f), VictimSpec)]
    for spec in specs:
        if not spec.model_kwargs:
            continue
        sig = json.dumps([spec.model, spec.dataset, spec.params, spec.model_kwargs],
                         sort_keys=True)
        if sig in built:
            continue
        try:
            with torch.device("meta"):
                build_victim(VictimSpec(model=spec.model, dataset=spec.dataset,
                                        params=spec.params, model_kwargs=spec.model_kwargs))
        except Exception as e:  # noqa: BLE001 - any failure to build is the kwargs' fault
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"{where}: model {spec.model} cannot be built with model_kwargs "
                            f"{spec.model_kwargs} ({type(e).__name__}: {first})") from None
        built.add(sig)


def _n_archs(stage: StageSpec, opts: RunOptions, n_profile: int | None) -> int:
    s = stage.archs
    assert s is not None
    if opts.all_archs or s.all:
        return N_UNIQUE if opts.unique else 15_625
    return opts.num_archs or n_profile or s.count


def _settings(st: StageSpec, over: StageOverride | None, prof_config: dict[str, Any],
              opts: RunOptions, where: str) -> tuple[dict[str, Any], dict[str, list[Any]],
                                                     Resources]:
    """A stage's config (profile merged in), grid and resources under one profile."""
    base = deep_merge(deep_merge(st.config, prof_config), over.config if over else {})
    grid = {**st.grid, **(over.grid if over else {})}
    _check_grid_keys(grid, where)
    try:
        res = Resources.model_validate({**st.resources.model_dump(),
                                        **(over.resources if over else {})})
    except ValidationError as e:
        raise UserError(format_validation_error(e, f"{where}: resources")) from None
    if opts.cpus_per_trial is not None or opts.gpus_per_trial is not None:
        res = Resources(cpu=opts.cpus_per_trial or res.cpu,
                        gpu=res.gpu if opts.gpus_per_trial is None else opts.gpus_per_trial)
    return base, grid, res


def _grid_points(base: dict[str, Any], case: dict[str, Any], grid: dict[str, list[Any]],
                 model: type[BaseModel], inject: dict[str, Any],
                 where: str) -> Iterator[dict[str, Any]]:
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        cfg = deep_merge(base, case)
        for k, v in zip(keys, combo, strict=True):
            _set_dotted(cfg, k, v, where)
        _inject(cfg, model, inject)
        yield cfg


def _make_trials(study: str, st: StageSpec, kind: Any,
                 configs: Iterator[tuple[dict[str, Any], str, str | None]],
                 built: set[str]) -> list[Trial]:
    """Validated, deduplicated, named trials from ``(config, where, source run id)``."""
    trials = []
    seen: set[str] = set()
    for cfg, where, source in configs:
        try:
            valid = kind.config_model.model_validate(cfg)
        except ValidationError as e:
            raise UserError(format_validation_error(e, where)) from None
        check_numbers(valid, where)
        _dry_build_victims(valid, where, built)
        canon = valid.model_dump(mode="json")
        key = trial_key(study, st.name, st.kind, canon)
        if key in seen:
            continue
        seen.add(key)
        name = kind.trial_name(valid) or f"{st.name}-{len(trials)}"
        if kind.name_prefix:  # "a0042 |nor_conv...": sorts, found at a glance
            name = f"{kind.name_prefix}{len(trials):04d} {name}"
        trials.append(Trial(key, name, st.name, st.kind, canon, source))
    return trials


def _selection(st: StageSpec, over: StageOverride | None,
               where: str) -> tuple[str, Selector, BaseModel]:
    """The derived stage's selector name, entry and validated config (profile fields merged
    in)."""
    assert st.select is not None
    fields = {**st.select.fields, **(over.select if over else {})}
    name = fields.pop("selector", st.select.selector)
    if name not in SELECTORS:
        raise UserError(f"{where}: select: unknown selector {name!r}; valid: "
                        f"{', '.join(SELECTORS.names())}")
    sel = SELECTORS.get(name)
    try:
        return name, sel, sel.validate(fields)
    except ValidationError as e:
        raise UserError(format_validation_error(e, f"{where}: select ({name})")) from None


def _field_path(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether the dotted ``parts`` name a field of ``model`` (into nested config models;
    anything below a plain dict or ``Any`` field is accepted)."""
    info = model.model_fields.get(parts[0])
    if info is None:
        return False
    if len(parts) == 1:
        return True
    opts = [info.annotation, *typing.get_args(info.annotation)]
    for t in opts:
        if isinstance(t, type) and issubclass(t, BaseModel) and _field_path(t, parts[1:]):
            return True
        if t is Any or t is dict or typing.get_origin(t) in (dict, collections.abc.Mapping):
            return True
    return False


#: metrics the runner adds to every trial run (study/trainable.py), whatever its kind
RUNNER_METRICS = ("time_total_s", "attempts")


def _check_source_path(path: str, what: str, source: StageSpec, source_kind: Any,
                       rows: bool, where: str) -> None:
    """A path into the source stage's items names something its kind can have."""
    try:
        root, parts = split_path(path)
    except ValueError as e:
        raise UserError(f"{where}: {what}: {e}") from None
    if root == "metrics":
        names = (*source_kind.metric_names(), *RUNNER_METRICS)
        if parts[0] not in names:
            raise UserError(f"{where}: {what}: {source.kind} trials (stage {source.name}) log "
                            f"no metric {parts[0]!r}; they log: {', '.join(names)}")
    elif root == "config" and not _field_path(source_kind.config_model, parts):
        raise UserError(f"{where}: {what}: {'.'.join(parts)!r} is not a config field of "
                        f"{source.kind} (stage {source.name})")
    elif root == "row" and not rows:
        raise UserError(f"{where}: {what}: {path} reads artifact rows, but the selector gives "
                        "none (set select: artifact: FILE.json)")


def _derivation(st: StageSpec, over: StageOverride | None, base: dict[str, Any],
                grid: dict[str, list[Any]], inject: dict[str, Any], model: type[BaseModel],
                earlier: dict[str, StagePlan], where: str) -> Derivation:
    """Check a derived stage against its source (before Ray starts) and bound its trials."""
    assert st.from_ is not None
    src = earlier[st.from_]
    src_kind = TRIAL_KINDS.get(src.spec.kind)
    name, sel, cfg = _selection(st, over, where)
    rows = sel.rows(cfg)
    for path in sel.reads(cfg):
        _check_source_path(path, "select", src.spec, src_kind, rows, where)
    for target, path in st.take.items():
        _check_source_path(path, f"take {target}", src.spec, src_kind, rows, where)
    both = sorted(set(st.take) & set(grid))
    if both:
        raise UserError(f"{where}: {both[0]!r} is both taken from the selected results and a "
                        "grid key; keep one")
    _check_grid_keys({**dict.fromkeys(st.take, [None]), **grid}, where, "take/grid key")
    for target in st.take:
        if not _field_path(model, target.split(".")):
            raise UserError(f"{where}: take {target}: not a config field of {st.kind}")
    n_src = len(src.trials) if src.derived is None else src.derived.upper
    n_items = sel.max_trials(n_src, cfg)
    n_grid = math.prod(len(v) for v in grid.values())
    upper = None if n_items is None else n_items * n_grid
    return Derivation(st.from_, name, cfg, dict(st.take), upper, base, grid, inject)


def build_plan(spec: StudySpec, opts: RunOptions) -> StudyPlan:
    """Expand every stage into validated trials (raises UserError on any bad value); a
    derived stage gets its :class:`Derivation`, checked, and no trials yet."""
    pname = spec.default_profile if opts.profile is None else opts.profile
    if pname not in spec.profiles:
        raise UserError(f"unknown profile {pname!r} for study {spec.name}; valid: "
                        f"{', '.join(spec.profiles)}")
    prof = spec.profiles[pname]
    params = spec.params if opts.params is None else opts.params
    dataset = prof.dataset if opts.dataset is None else opts.dataset
    if dataset is not None and dataset not in DATASETS:
        DATASETS.get(dataset)  # raises the one-line error listing valid datasets
    seed = opts.seed if opts.seed is not None else prof.seed
    inject = {"dataset": dataset, "seed": seed, "params": params, "amp": opts.amp,
              "unique": True if opts.unique else None}
    stages: dict[str, StagePlan] = {}
    n_total = 0
    built: set[str] = set()
    for st in spec.stages:
        where = f"study {spec.name}, profile {pname}, stage {st.name}"
        kind = TRIAL_KINDS.get(st.kind)
        model = kind.config_model
        over = prof.stages.get(st.name)
        base, grid, res = _settings(st, over, prof.config, opts, where)
        if st.from_ is not None:
            d = _derivation(st, over, base, grid, inject, model, stages, where)
            n_total += d.upper or 0
            _check_total(n_total, where, "selected x grid")
            stages[st.name] = StagePlan(st, res, [], d)
            continue
        cases = (over.cases if over is not None and over.cases is not None else st.cases) or [{}]
        n_points = len(cases) * math.prod(len(v) for v in grid.values())
        n_archs = _n_archs(st, opts, prof.num_archs) if st.archs is not None else 1
        n_total += n_points * n_archs
        _check_total(n_total, where, f"cases x grid{' x archs' if st.archs is not None else ''}")
        configs: Iterator[dict[str, Any]] = (
            cfg for case in cases for cfg in _grid_points(base, case, grid, model, inject, where))
        if st.archs is not None:
            archs = _archs(st, opts, prof.num_archs)
            pts = list(configs)
            configs = ({**p, "arch": a} for a in archs for p in pts)
        trials = _make_trials(spec.name, st, kind, ((c, where, None) for c in configs), built)
        stages[st.name] = StagePlan(st, res, trials)
    return StudyPlan(spec, pname, params, opts, list(stages.values()))


def _check_total(n_total: int, where: str, how: str) -> None:
    if n_total > MAX_TRIALS:
        raise UserError(f"{where}: the plan has {n_total:,} trials so far ({how}), more than "
                        f"the {MAX_TRIALS:,} one study may hold; shrink the grid or split the "
                        "study")


def item_label(item: dict[str, Any]) -> str:
    """``calibrate-00003 (run 5f2c...)``, plus the row of an artifact row."""
    row = f", row {item['row_index']}" if "row_index" in item else ""
    return f"{item.get('name')} (run {item.get('run_id')}{row})"


def derive_trials(plan: StudyPlan, stage: StagePlan, items: list[dict[str, Any]]) -> list[Trial]:
    """The trials of the derived ``stage`` from its selected ``items`` (see
    :mod:`nasrisk.study.selectors`): validated, keyed and named as :func:`build_plan` does, so
    the same selection gives the same trials. UserError naming the stage and the item when a
    value is missing or does not validate."""
    d = stage.derived
    assert d is not None
    st = stage.spec
    kind = TRIAL_KINDS.get(st.kind)
    where = f"study {plan.spec.name}, profile {plan.profile}, stage {st.name}"
    n_grid = math.prod(len(v) for v in d.grid.values())
    _check_total(plan.n_trials + len(items) * n_grid, where, f"{len(items)} selected x grid")

    def configs() -> Iterator[tuple[dict[str, Any], str, str | None]]:
        for item in items:
            at = f"{where}, selected {item_label(item)}"
            case: dict[str, Any] = {}
            for target, path in d.take.items():
                try:
                    value = item_value(item, path)
                except MissingValue:
                    raise UserError(f"{at}: take {target}: it has no {path}") from None
                _set_dotted(case, target, copy.deepcopy(value), at)
            for cfg in _grid_points(d.base, {}, d.grid, kind.config_model, d.inject, at):
                yield deep_merge(cfg, case), at, item.get("run_id")

    return _make_trials(plan.spec.name, st, kind, configs(), set())


def check_profiles(spec: StudySpec) -> None:
    """Plan every profile of ``spec`` with no command-line overrides, so a broken field in a
    profile nobody is running yet fails now (UserError), not when that profile is run."""
    for pname in spec.profiles:
        build_plan(spec, RunOptions(profile=pname))


def count_trials(spec: StudySpec, profile: str) -> list[tuple[str, int | None]]:
    """``(stage, trials)`` of ``profile`` with no command-line overrides, counted from the
    cases, grid and archs alone, so without importing a trial kind (no torch: ``nasrisk
    studies`` answers at once). Equals :func:`build_plan`'s counts when no two grid points
    validate to the same trial, as in every built-in study (tests/test_study_plan.py). A
    derived stage counts its upper bound (its :attr:`Derivation.upper`; None: not known
    before its source has run)."""
    prof = spec.profiles[profile]
    out: list[tuple[str, int | None]] = []
    counts: dict[str, int | None] = {}
    for st in spec.stages:
        over = prof.stages.get(st.name)
        grid = {**st.grid, **(over.grid if over else {})}
        n_grid = math.prod(len(v) for v in grid.values())
        n: int | None
        if st.from_ is not None:
            _, sel, cfg = _selection(st, over, f"study {spec.name}, stage {st.name}")
            n_items = sel.max_trials(counts[st.from_], cfg)
            n = None if n_items is None else n_items * n_grid
        else:
            cases = (over.cases if over is not None and over.cases is not None
                     else st.cases) or [{}]
            n = len(cases) * n_grid
            if st.archs is not None:
                n *= _n_archs(st, RunOptions(profile=profile), prof.num_archs)
        counts[st.name] = n
        out.append((st.name, n))
    return out
