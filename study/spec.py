"""The typed study schema: YAML in, validated :class:`StudySpec` out.

A study is a list of stages; each stage names a trial kind (a ``TRIAL_KINDS`` entry), the
resources one trial needs, fixed ``config`` fields of that kind and an optional ``grid`` (the
product of the listed values), or, for a derived stage, ``from: STAGE`` with ``select`` and
``take`` (its cases are chosen from that earlier stage's results when it is done).
Profiles (``smoke``, ``paper``, ...) override dataset, arch count, seed, config fields and a
derived stage's ``select`` fields. Everything is validated here, before Ray starts: an unknown
field, kind, dataset or profile, a malformed arch string, a negative epoch count all raise
:class:`~nasrisk.trials.errors.UserError` with one line naming the problem.

Reading a study file is guarded too: it must be UTF-8 text of at most
:data:`MAX_STUDY_BYTES`; duplicate mapping keys are refused (YAML keeps the last one silently);
aliases may not expand the document past :data:`MAX_YAML_NODES` nodes (a 1 KB "billion
laughs" file would otherwise become gigabytes once a plan copies it) nor nest deeper than
:data:`MAX_YAML_DEPTH`.
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
)

from nasrisk.trials.errors import UserError

STRICT = ConfigDict(extra="forbid", frozen=True)

MAX_STUDY_BYTES = 8 * 2**20
#: nodes of the YAML document with every alias expanded; the built-in studies have < 1,000, a
#: grid listing all 15,625 NATS arch strings ~16,000
MAX_YAML_NODES = 250_000
MAX_YAML_DEPTH = 64
#: the names of nasrisk.analysis.reports.REPORTS (importing it here would load MLflow for
#: every command; tests/test_cli_errors.py checks the two agree)
REPORT_NAMES = ("automl", "evas", "evas-atlas", "evas-search", "evas-eval")


class Resources(BaseModel):
    """What one trial of a stage asks Ray for (fractional GPUs let small trials share one)."""

    model_config = STRICT
    cpu: float = Field(1.0, gt=0, le=1024, allow_inf_nan=False)
    gpu: float = Field(0.0, ge=0, le=64, allow_inf_nan=False)


class ArchSampling(BaseModel):
    """Sample NATS-Bench arch strings into the config field ``arch`` of each trial."""

    model_config = STRICT
    count: int = Field(24, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)
    all: bool = False  # every one of the 15,625 strings (the reference scripts' walk)
    distinct: Literal["isomorphism", "string"] = "isomorphism"


class SelectSpec(BaseModel):
    """``select:`` of a derived stage: a selector's name (an entry of
    :data:`nasrisk.study.selectors.SELECTORS`) and that selector's own fields, validated
    against its config model when the study is planned."""

    model_config = ConfigDict(extra="allow", frozen=True)
    selector: str = Field(min_length=1)

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StageSpec(BaseModel):
    """One stage. A *derived* stage says ``from: STAGE`` (an earlier stage), ``select`` (which
    of its finished trials, see :mod:`nasrisk.study.selectors`) and ``take`` (this stage's
    config field -> a path into each selected item: ``config.FIELD``, ``metrics.NAME``,
    ``key``, ``run_id``, ``row.FIELD``); each selected item is one case, crossed with the
    grid."""

    # `from` is a Python keyword: the field is from_, spelled `from` in YAML (only)
    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    kind: str
    description: str = ""
    resources: Resources = Resources()
    config: dict[str, Any] = {}
    #: partial configs, each deep-merged into ``config`` (crossed with ``grid``): for values
    #: that go together, e.g. a model and the size arguments that only it takes
    cases: list[dict[str, Any]] = []
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    archs: ArchSampling | None = None
    #: earlier stages that must be complete (every trial done) before this one runs
    needs: list[str] = []
    from_: str | None = Field(None, alias="from")
    select: SelectSpec | None = None
    take: dict[str, str] = {}

    @model_serializer(mode="wrap")
    def _omit_unused_derivation(self, handler: Any) -> dict[str, Any]:
        # `from: null`, `select: null`, `take: {}` on every plain stage would be noise in
        # `nasrisk studies --show`
        out = handler(self)
        for k in ("from", "from_", "select"):
            if k in out and out[k] is None:
                del out[k]
        if out.get("take") == {}:
            del out["take"]
        return out


class StageOverride(BaseModel):
    """What a profile changes in one stage: config merged in, cases and resources replaced,
    grid entries added or replaced."""

    model_config = STRICT
    config: dict[str, Any] = {}
    cases: list[dict[str, Any]] | None = None
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    resources: dict[str, Any] = {}
    #: a derived stage's selector fields (``{k: 10}``) merged into its ``select``
    select: dict[str, Any] = {}


class ProfileSpec(BaseModel):
    model_config = STRICT
    description: str = ""
    dataset: str | None = None
    num_archs: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    #: merged into every stage's config (nested dicts merge key by key)
    config: dict[str, Any] = {}
    #: per stage: {"config": {...}, "cases": [...], "grid": {...}, "resources": {...}}
    stages: dict[str, StageOverride] = {}

    @field_serializer("stages")
    def _dump_overrides(self, stages: dict[str, StageOverride]) -> dict[str, dict[str, Any]]:
        return {k: v.model_dump(mode="json", exclude_unset=True) for k, v in stages.items()}


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

    @field_validator("report")
    @classmethod
    def _known_report(cls, v: str | None) -> str | None:
        if v is not None and v not in REPORT_NAMES:
            raise ValueError(f"unknown report {v!r}; valid: {', '.join(REPORT_NAMES)}")
        return v


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


class _StudyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader``; :func:`parse_yaml` checks the composed node tree before building
    Python values from it."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Refuse duplicate keys, alias expansion past :data:`MAX_YAML_NODES` and nesting past
    :data:`MAX_YAML_DEPTH`. Iterative, memoised by node (an alias is the same node object), so
    an alias bomb is measured without being expanded."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if isinstance(node, yaml.ScalarNode):
            size[nid], depth[nid] = 1, 1
            continue
        if isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        else:
            kids = list(node.value)
        if done:
            on_path.discard(nid)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            depth[nid] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[nid] > MAX_YAML_NODES:
                raise UserError(f"{where}: line {node.start_mark.line + 1}: aliases expand this "
                                f"document past {MAX_YAML_NODES:,} values (an alias bomb?); "
                                "write the values out or use fewer aliases")
            if depth[nid] > MAX_YAML_DEPTH:
                raise UserError(f"{where}: line {node.start_mark.line + 1}: nested more than "
                                f"{MAX_YAML_DEPTH} levels deep")
            continue
        if nid in size:
            continue
        if nid in on_path:
            raise UserError(f"{where}: line {node.start_mark.line + 1}: an alias refers to "
                            "a value that contains it (recursive YAML)")
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                    continue
                if (key.tag, key.value) in seen:
                    raise UserError(f"{where}: line {key.start_mark.line + 1}: duplicate key "
                                    f"{key.value!r} (first at line {seen[key.tag, key.value]})")
                seen[key.tag, key.value] = key.start_mark.line + 1
        on_path.add(nid)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values, safely (see the module docstring); UserError otherwise."""
    loader = _StudyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, where)
        return loader.construct_document(node)
    except RecursionError:
        raise UserError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}:{at} is not valid YAML ({problem})") from None
    finally:
        loader.dispose()


def read_study_file(path: Path, where: str) -> str:
    """The text of a study file: readable, at most :data:`MAX_STUDY_BYTES`, UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STUDY_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read study file {path}: {e.strerror or e}") from None
    if len(data) > MAX_STUDY_BYTES:
        raise UserError(f"{where}: larger than {MAX_STUDY_BYTES // 2**20} MiB; a study file "
                        "lists stages and grids, not data")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                        f"{e.start}); save it as UTF-8") from None


def load_spec(study: str) -> StudySpec:
    """A built-in study name or a path to a YAML study file -> validated spec."""
    path = Path(study)
    if study in builtin_names():
        path = builtin_dir() / f"{study}.yaml"
        where = f"built-in study {study}"
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise UserError(f"study file {path} not found")
        if not path.is_file():
            raise UserError(f"study file {path} is not a file")
        where = str(path)
    else:
        raise UserError(f"unknown study {study!r}; built-in: {', '.join(builtin_names())} "
                        "(or give a path to a .yaml study file)")
    return validate_spec(parse_yaml(read_study_file(path, where), where), where)


def validate_spec(raw: Any, where: str) -> StudySpec:
    """Parsed YAML -> a spec whose stages and profiles refer to each other consistently."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a study file must be a YAML mapping")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, where)) from None
    if spec.default_profile not in spec.profiles:
        raise UserError(f"{where}: default_profile {spec.default_profile!r} is not a profile")
    names = [s.name for s in spec.stages]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{where}: two stages are named {dup!r}")
    for i, s in enumerate(spec.stages):
        for need in s.needs:
            if need not in names[:i]:
                raise UserError(f"{where}: stage {s.name} needs {need!r}, which is not an "
                                "earlier stage")
        _check_derivation(s, names[:i], names, where)
    for pname, prof in spec.profiles.items():
        for sname, over in prof.stages.items():
            if sname not in names:
                raise UserError(f"{where}: profile {pname} overrides unknown stage {sname!r}; "
                                f"stages: {', '.join(names)}")
            derived = spec.stages[names.index(sname)].from_ is not None
            if derived and over.cases is not None:
                raise UserError(f"{where}: profile {pname}: stage {sname} is derived (its "
                                "cases are the selected results); it takes no cases")
            if not derived and over.select:
                raise UserError(f"{where}: profile {pname}: stage {sname} sets select, but "
                                "it has no from: STAGE")
    return spec


def _check_derivation(s: StageSpec, earlier: list[str], names: list[str], where: str) -> None:
    """``from`` names an earlier stage and comes with ``select``; a derived stage has no
    ``cases`` or ``archs`` (its cases are the selected results); ``select`` and ``take``
    only come with ``from``."""
    at = f"{where}: stage {s.name}"
    if s.from_ is None:
        if s.select is not None or s.take:
            raise UserError(f"{at}: {'select' if s.select is not None else 'take'} needs "
                            "from: STAGE (the earlier stage to select from)")
        return
    if s.from_ not in names:
        raise UserError(f"{at}: from {s.from_!r}: no such stage; stages: {', '.join(names)}")
    if s.from_ not in earlier:
        raise UserError(f"{at}: from {s.from_!r}: not an earlier stage (a stage derives only "
                        "from stages listed before it)")
    if s.select is None:
        raise UserError(f"{at}: from {s.from_} needs select: {{selector: NAME, ...}} "
                        "(e.g. best, top_k, every_kth, each_result)")
    for name in ("cases", "archs"):
        if getattr(s, name):
            raise UserError(f"{at}: a derived stage (from {s.from_}) takes its cases from "
                            f"the selected results; it has no {name}")


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a study's description) as ``|`` blocks, not quoted with blank
    lines between their lines."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value.strip("\n") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def spec_to_yaml(spec: StudySpec) -> str:
    """The spec as a study file (``spec_from_yaml`` reads it back to an equal spec); long
    strings stay on one line."""
    return yaml.dump(spec.model_dump(mode="json", by_alias=True), Dumper=_Dumper, sort_keys=False,
                     width=10_000, allow_unicode=True)


def summary_line(description: str | None) -> str:
    """The first sentence of a description, its line breaks joined (``nasrisk studies``)."""
    text = " ".join((description or "").split())
    m = re.search(r"(?<=[.!?])\s+(?=[A-Z])", text)
    return text[:m.start()] if m else text


def spec_from_yaml(text: str, where: str = "saved study") -> StudySpec:
    if not isinstance(text, str):
        raise UserError(f"{where}: not YAML text")
    return validate_spec(parse_yaml(text, where), where)
