"""The typed study schema: YAML in, validated :class:`StudySpec` out.

A study is a list of stages; each stage names a trial kind (a ``TRIAL_KINDS`` entry), the
resources one trial needs, fixed ``config`` fields of that kind and an optional ``grid`` (the
product of the listed values). Profiles (``smoke``, ``paper``, ...) override dataset, arch
count, seed and config fields. Everything is validated here, before Ray starts: an unknown
field, kind, dataset or profile, a malformed arch string, a negative epoch count all raise
:class:`~nasrisk.trials.errors.UserError` with one line naming the problem.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nasrisk.trials.errors import UserError

STRICT = ConfigDict(extra="forbid", frozen=True)


class Resources(BaseModel):
    """What one trial of a stage asks Ray for (fractional GPUs let small trials share one)."""

    model_config = STRICT
    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class ArchSampling(BaseModel):
    """Sample NATS-Bench arch strings into the config field ``arch`` of each trial."""

    model_config = STRICT
    count: int = Field(24, ge=1)
    seed: int = 0
    all: bool = False  # every one of the 15,625 strings (the reference scripts' walk)
    distinct: Literal["isomorphism", "string"] = "isomorphism"


class StageSpec(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    kind: str
    description: str = ""
    resources: Resources = Resources()
    config: dict[str, Any] = {}
    #: partial configs, each deep-merged into ``config`` (crossed with ``grid``): for values
    #: that go together, e.g. a model and the size arguments that only it takes
    cases: list[dict[str, Any]] = []
    grid: dict[str, list[Any]] = {}
    archs: ArchSampling | None = None
    needs: list[str] = []  # earlier stages whose outputs this stage reads


class ProfileSpec(BaseModel):
    model_config = STRICT
    description: str = ""
    dataset: str | None = None
    num_archs: int | None = Field(None, ge=1)
    seed: int | None = None
    #: merged into every stage's config (nested dicts merge key by key)
    config: dict[str, Any] = {}
    #: per stage: {"config": {...}, "cases": [...], "grid": {...}, "resources": {...}}
    stages: dict[str, dict[str, Any]] = {}


class StudySpec(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    params: Literal["paper", "artifact"] = "paper"
    default_profile: str = "smoke"
    #: the analysis `nasrisk report` builds (an entry of nasrisk.analysis.reports.REPORTS)
    report: str | None = None
    profiles: dict[str, ProfileSpec]
    stages: list[StageSpec] = Field(min_length=1)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``; nested dicts merge key by key."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line: the first offending field and what is wrong with it."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    extra = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    value = first.get("input")
    shown = f" (got {value!r})" if first["type"] != "extra_forbidden" and not isinstance(
        value, dict) and value is not None and len(repr(value)) < 60 else ""
    return f"{where}: {loc}: {msg}{shown}{extra}"


def builtin_dir() -> Path:
    return Path(str(resources.files("nasrisk.study.builtin")))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.yaml"))


def load_spec(study: str) -> StudySpec:
    """A built-in study name or a path to a YAML study file -> validated spec."""
    path = Path(study)
    if study in builtin_names():
        path = builtin_dir() / f"{study}.yaml"
        where = f"built-in study {study}"
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"study file {path} not found")
        where = str(path)
    else:
        raise UserError(f"unknown study {study!r}; built-in: {', '.join(builtin_names())} "
                        "(or give a path to a .yaml study file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" line {line + 1}" if line is not None else ""
        raise UserError(f"{where}:{at} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a study file must be a YAML mapping")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, where)) from None
    if spec.default_profile not in spec.profiles:
        raise UserError(f"{where}: default_profile {spec.default_profile!r} is not a profile")
    names = [s.name for s in spec.stages]
    for i, s in enumerate(spec.stages):
        for need in s.needs:
            if need not in names[:i]:
                raise UserError(f"{where}: stage {s.name} needs {need!r}, which is not an "
                                "earlier stage")
    for pname, prof in spec.profiles.items():
        for sname in prof.stages:
            if sname not in names:
                raise UserError(f"{where}: profile {pname} overrides unknown stage {sname!r}; "
                                f"stages: {', '.join(names)}")
    return spec


def spec_to_yaml(spec: StudySpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


def spec_from_yaml(text: str, where: str = "saved study") -> StudySpec:
    try:
        return StudySpec.model_validate(yaml.safe_load(text))
    except ValidationError as e:
        raise UserError(format_validation_error(e, where)) from None
