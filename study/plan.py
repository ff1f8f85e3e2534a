"""Trial expansion: (spec, profile, command-line options) -> the validated trials of each
stage, each with a deterministic key (a hash of its study, stage, kind and full config) that
names it in Ray Tune, in MLflow and in the stores. Nothing here runs a trial.

Beyond each trial kind's own config model, every planned config is checked for values no
trial can run with: non-finite floats, integers past :data:`MAX_INT` (seeds: outside
``[0, 2**32)``, what torch and numpy both take), victims whose ``model_kwargs`` do not build a
network, and studies of more than :data:`MAX_TRIALS` trials (counted before any is expanded).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

import nasrisk.trials  # noqa: F401  (registers every entry)
from nasrisk.trials.errors import UserError
from nasrisk.trials.registry import DATASETS, TRIAL_KINDS

from .spec import Resources, StageSpec, StudySpec, deep_merge, format_validation_error

#: trials one study may plan (all 15,625 NATS archs x a few settings fit; a typo'd grid of
#: 2,000 x 2,000 values does not, and would take minutes just to be listed)
MAX_TRIALS = 100_000
#: the largest integer a config field may hold (sizes, counts, epochs: C's int, what torch
#: shapes and loops take); seeds have their own range
MAX_INT = 2**31 - 1
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class RunOptions:
    """What the command line may override (None: the profile's value)."""

    profile: str | None = None
    dataset: str | None = None
    num_archs: int | None = None
    all_archs: bool = False
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


def _check_grid_keys(grid: dict[str, list[Any]], where: str) -> None:
    for a in grid:
        if not a or any(not part for part in a.split(".")):
            raise UserError(f"{where}: grid key {a!r} is not a field name (or a dotted path)")
        for b in grid:
            if b.startswith(a + "."):
                raise UserError(f"{where}: grid keys {a!r} and {b!r} overlap (one sets a "
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
    from nasrisk.trials.models.nats.arch_string import all_archs, sample_archs

    s = stage.archs
    assert s is not None
    if opts.all_archs or s.all:
        return all_archs()
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
        return 15_625
    return opts.num_archs or n_profile or s.count


def build_plan(spec: StudySpec, opts: RunOptions) -> StudyPlan:
    """Expand every stage into validated trials (raises UserError on any bad value)."""
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
    stages = []
    n_total = 0
    built: set[str] = set()
    for st in spec.stages:
        where = f"study {spec.name}, profile {pname}, stage {st.name}"
        kind = TRIAL_KINDS.get(st.kind)
        model = kind.config_model
        over = prof.stages.get(st.name)
        base = deep_merge(deep_merge(st.config, prof.config), over.config if over else {})
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
        cases = (over.cases if over is not None and over.cases is not None else st.cases) or [{}]
        keys = list(grid)
        n_points = len(cases) * math.prod(len(grid[k]) for k in keys)
        n_archs = _n_archs(st, opts, prof.num_archs) if st.archs is not None else 1
        n_total += n_points * n_archs
        if n_total > MAX_TRIALS:
            raise UserError(f"{where}: the plan has {n_total:,} trials so far (cases x grid"
                            f"{' x archs' if st.archs is not None else ''}), more than the "
                            f"{MAX_TRIALS:,} one study may hold; shrink the grid or split "
                            "the study")

        def points(cases=cases, keys=keys, grid=grid, base=base, where=where,
                   model=model) -> Iterator[dict[str, Any]]:
            for case in cases:
                for combo in itertools.product(*(grid[k] for k in keys)):
                    cfg = deep_merge(base, case)
                    for k, v in zip(keys, combo, strict=True):
                        _set_dotted(cfg, k, v, where)
                    _inject(cfg, model, {"dataset": dataset, "seed": seed, "params": params,
                                     "amp": opts.amp})
                    yield cfg

        configs: Iterator[dict[str, Any]] = points()
        if st.archs is not None:
            archs = _archs(st, opts, prof.num_archs)
            pts = list(configs)
            configs = ({**p, "arch": a} for a in archs for p in pts)
        trials = []
        seen: set[str] = set()
        for cfg in configs:
            try:
                valid = model.model_validate(cfg)
            except ValidationError as e:
                raise UserError(format_validation_error(e, where)) from None
            check_numbers(valid, where)
            _dry_build_victims(valid, where, built)
            canon = valid.model_dump(mode="json")
            key = trial_key(spec.name, st.name, st.kind, canon)
            if key in seen:
                continue
            seen.add(key)
            name = kind.trial_name(valid) or f"{st.name}-{len(trials)}"
            if kind.name_prefix:  # "a0042 |nor_conv...": sorts, found at a glance
                name = f"{kind.name_prefix}{len(trials):04d} {name}"
            trials.append(Trial(key, name, st.name, st.kind, canon))
        stages.append(StagePlan(st, res, trials))
    return StudyPlan(spec, pname, params, opts, stages)


def check_profiles(spec: StudySpec) -> None:
    """Plan every profile of ``spec`` with no command-line overrides, so a broken field in a
    profile nobody is running yet fails now (UserError), not when that profile is run."""
    for pname in spec.profiles:
        build_plan(spec, RunOptions(profile=pname))


def copy_dict(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


def count_trials(spec: StudySpec, profile: str) -> list[tuple[str, int]]:
    """``(stage, trials)`` of ``profile`` with no command-line overrides, counted from the
    cases, grid and archs alone, so without importing a trial kind (no torch: ``nasrisk
    studies`` answers at once). Equals :func:`build_plan`'s counts when no two grid points
    validate to the same trial, as in every built-in study (tests/test_study_plan.py)."""
    prof = spec.profiles[profile]
    out = []
    for st in spec.stages:
        over = prof.stages.get(st.name)
        grid = {**st.grid, **(over.grid if over else {})}
        cases = (over.cases if over is not None and over.cases is not None else st.cases) or [{}]
        n = len(cases) * math.prod(len(v) for v in grid.values())
        if st.archs is not None:
            n *= _n_archs(st, RunOptions(profile=profile), prof.num_archs)
        out.append((st.name, n))
    return out
