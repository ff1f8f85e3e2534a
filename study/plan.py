"""Trial expansion: (spec, profile, command-line options) -> the validated trials of each
stage, each with a deterministic key (a hash of its study, stage, kind and full config) that
names it in Ray Tune, in MLflow and in the stores. Nothing here runs a trial."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

import nasrisk.trials  # noqa: F401  (registers every entry)
from nasrisk.trials.errors import UserError
from nasrisk.trials.registry import DATASETS, TRIAL_KINDS

from .spec import Resources, StageSpec, StudySpec, deep_merge, format_validation_error


@dataclass(frozen=True)
class RunOptions:
    """What the command line may override (None: the profile's value)."""

    profile: str | None = None
    dataset: str | None = None
    num_archs: int | None = None
    all_archs: bool = False
    seed: int | None = None
    params: str | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float | None = None
    max_failures: int = 2

    def __post_init__(self) -> None:
        if self.num_archs is not None and self.num_archs < 1:
            raise UserError(f"--num-archs must be at least 1 (got {self.num_archs})")
        if self.max_failures < 0:
            raise UserError(f"--max-failures must be >= 0 (got {self.max_failures})")
        for flag, v in (("--cpus-per-trial", self.cpus_per_trial),
                        ("--gpus-per-trial", self.gpus_per_trial)):
            if v is not None and v < 0:
                raise UserError(f"{flag} must be >= 0 (got {v})")
        if self.cpus_per_trial == 0:
            raise UserError("--cpus-per-trial must be > 0")
        if self.params not in (None, "paper", "artifact"):
            raise UserError(f"--params must be paper or artifact (got {self.params!r})")


@dataclass(frozen=True)
class Trial:
    key: str
    name: str
    stage: str
    kind: str
    config: dict[str, Any]


@dataclass
class StagePlan:
    spec: StageSpec
    resources: Resources
    trials: list[Trial] = field(default_factory=list)


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


def trial_key(study: str, stage: str, kind: str, config: dict[str, Any]) -> str:
    blob = json.dumps({"study": study, "stage": stage, "kind": kind, "config": config},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_dotted(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


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
    from nasrisk.trials.models.nats.arch_string import all_archs, sample_archs

    s = stage.archs
    assert s is not None
    if opts.all_archs or s.all:
        return all_archs()
    n = opts.num_archs or n_profile or s.count
    return sample_archs(n, seed=s.seed, distinct=s.distinct)


def build_plan(spec: StudySpec, opts: RunOptions) -> StudyPlan:
    """Expand every stage into validated trials (raises UserError on any bad value)."""
    pname = opts.profile or spec.default_profile
    if pname not in spec.profiles:
        raise UserError(f"unknown profile {pname!r} for study {spec.name}; valid: "
                        f"{', '.join(spec.profiles)}")
    prof = spec.profiles[pname]
    params = opts.params or spec.params
    dataset = opts.dataset or prof.dataset
    if dataset is not None and dataset not in DATASETS:
        DATASETS.get(dataset)  # raises the one-line error listing valid datasets
    seed = opts.seed if opts.seed is not None else prof.seed
    stages = []
    for st in spec.stages:
        kind = TRIAL_KINDS.get(st.kind)
        model = kind.config_model
        over = prof.stages.get(st.name, {})
        bad = set(over) - {"config", "cases", "grid", "resources"}
        if bad:
            raise UserError(f"profile {pname}, stage {st.name}: unknown override "
                            f"{sorted(bad)[0]!r} (valid: config, cases, grid, resources)")
        base = deep_merge(deep_merge(st.config, prof.config), over.get("config", {}))
        grid = {**st.grid, **over.get("grid", {})}
        for gk, gv in grid.items():
            if not isinstance(gv, list) or not gv:
                raise UserError(f"stage {st.name}: grid.{gk} must be a non-empty list")
        try:
            res = Resources.model_validate({**st.resources.model_dump(),
                                            **over.get("resources", {})})
        except ValidationError as e:
            raise UserError(format_validation_error(e, f"stage {st.name} resources")) from None
        if opts.cpus_per_trial is not None or opts.gpus_per_trial is not None:
            res = Resources(cpu=opts.cpus_per_trial or res.cpu,
                            gpu=res.gpu if opts.gpus_per_trial is None else opts.gpus_per_trial)
        cases = over.get("cases", st.cases) or [{}]
        if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
            raise UserError(f"stage {st.name}: cases must be a list of mappings")
        points: list[dict[str, Any]] = []
        keys = list(grid)
        for case in cases:
            for combo in itertools.product(*(grid[k] for k in keys)):
                cfg = deep_merge(base, case)
                for k, v in zip(keys, combo, strict=True):
                    _set_dotted(cfg, k, v)
                _inject(cfg, model, {"dataset": dataset, "seed": seed, "params": params})
                points.append(cfg)
        if st.archs is not None:
            archs = _archs(st, opts, prof.num_archs)
            points = [{**p, "arch": a} for a in archs for p in points]
        trials = []
        seen: set[str] = set()
        where = f"study {spec.name}, profile {pname}, stage {st.name}"
        for cfg in points:
            try:
                valid = model.model_validate(cfg)
            except ValidationError as e:
                raise UserError(format_validation_error(e, where)) from None
            canon = valid.model_dump(mode="json")
            key = trial_key(spec.name, st.name, st.kind, canon)
            if key in seen:
                continue
            seen.add(key)
            name = kind.trial_name(valid) if hasattr(kind, "trial_name") else f"{st.name}-{len(trials)}"
            trials.append(Trial(key, name, st.name, st.kind, canon))
        stages.append(StagePlan(st, res, trials))
    return StudyPlan(spec, pname, params, opts, stages)


def copy_dict(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))
