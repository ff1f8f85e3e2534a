"""Model lineage: a stored model is a base plus an ordered tuple of steps (issue 8, "Spine II").

* The **base** is what :class:`~nasrisk.trials.victims.VictimSpec` has always named: model (or
  NATS arch, or genotype), dataset, recipe, seed. Its key is the victim key of before
  (``victim/2``), so stored clean victims are reused as they are.
* A **step** is one registered :class:`StepKind` (``STEP_KINDS``: ``label_flip``,
  ``fine_tune``, ...) with its own typed config; :class:`StepSpec` holds it as
  ``{"kind": NAME, ...the config's fields, all resolved}``, validated by the kind's config
  model (unknown kinds and fields are errors naming them).
* The key of a child is :func:`child_key`: the hash of its parent's key, its step's canonical
  dump and its step kind's version. A change anywhere up the lineage (the base seed, the
  first step's fraction) changes the key of every descendant; a parent is trained once
  however many children it has.

Store entries, locks and the walk from base to leaf: :func:`nasrisk.trials.victims.ensure_victim`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .registry import STEP_KINDS

if TYPE_CHECKING:
    from torch import nn

    from .context import TrialContext
    from .data.base import ImageData
    from .victims import VictimSpec

#: apply(parent_model | None, parent_record | None, spec, data, ctx) -> (model, metrics)
ApplyFn = Callable[["nn.Module | None", "dict[str, Any] | None", "VictimSpec", "ImageData",
                    "TrialContext"], "tuple[nn.Module, dict[str, float]]"]


@dataclass(frozen=True)
class StepKind:
    """One lineage step kind, registered in ``STEP_KINDS`` under its name.

    * ``config_model``: the pydantic model of the step's config (``extra="forbid"``);
    * ``apply(parent_model, parent_record, spec, data, ctx) -> (model, metrics)``: makes the
      child of ``spec`` (whose last step is this one; ``spec.base()`` says how to build the
      network) on ``data`` (the base's train/test subsets). ``parent_model`` is the trained
      parent (a copy the step may change) and ``parent_record`` its store record when
      ``uses_parent``, else both are None. ``metrics`` has exactly the names in ``metrics``;
      the one named ``acc_metric`` is the child's clean test accuracy. Training goes through
      the one loop (:func:`~nasrisk.trials.train.train`) with resumable state under
      ``"model/<child key>"``;
    * ``uses_parent``: whether the step needs the parent's weights (``fine_tune`` does;
      ``label_flip`` trains from scratch with the base recipe, so it needs no trained parent);
      a child of a ``uses_parent`` step records its parent's SHA-256 and is rebuilt when the
      parent's stored weights change;
    * ``first_only``: the step trains from the base alone, so only a first step may be it
      (after another step it would silently discard that step);
    * ``version``: part of every child key; bump it when ``apply`` changes what it makes;
    * ``describe(cfg)``: the step in words (default ``name(field=value, ...)``);
    * ``build(spec)``: the untrained network of a child whose architecture differs from its
      parent's (a replica); None (the default): the parent's architecture.
    """

    config_model: type[BaseModel]
    apply: ApplyFn
    uses_parent: bool
    version: str
    metrics: tuple[str, ...]
    acc_metric: str
    first_only: bool = False
    describe: Callable[[Any], str] | None = None
    build: Callable[[VictimSpec], nn.Module] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.acc_metric not in self.metrics:
            raise ValueError(f"acc_metric {self.acc_metric!r} is not one of {self.metrics}")

    def words(self, name: str, cfg: BaseModel) -> str:
        if self.describe is not None:
            return self.describe(cfg)
        fields = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in cfg.model_dump(mode="json").items() if v is not None)
        return f"{name}({fields})"


class StepSpec(BaseModel):
    """One step of a lineage: ``{"kind": NAME, ...fields}``. The fields are validated (and
    completed with their defaults) by the kind's config model, so the dump is canonical: two
    spellings of one step dump, and hash, the same."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str

    @model_validator(mode="before")
    @classmethod
    def _typed(cls, data: Any) -> Any:
        if isinstance(data, StepSpec):
            return data.model_dump(mode="json")
        if not isinstance(data, Mapping):
            raise ValueError(f"a step is a mapping {{kind: NAME, ...its fields}}, got {data!r}")
        if "kind" not in data:
            raise ValueError(f"a step needs a `kind` (one of: {', '.join(STEP_KINDS.names())})")
        name = STEP_KINDS.validate_name(str(data["kind"]))
        fields = {k: v for k, v in data.items() if k != "kind"}
        try:
            cfg = STEP_KINDS.get(name).config_model.model_validate(fields)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "(config)"
            raise ValueError(f"step {name}: {loc}: {first['msg']}") from None
        return {"kind": name, **cfg.model_dump(mode="json")}

    @property
    def step_kind(self) -> StepKind:
        return STEP_KINDS.get(self.kind)

    def config(self) -> BaseModel:
        """The step's config as its kind's model."""
        return self.step_kind.config_model.model_validate(dict(self.model_extra or {}))

    def dump(self) -> dict[str, Any]:
        """``{"kind": ..., ...every field}``: the canonical form that the key hashes."""
        return self.model_dump(mode="json")

    def describe(self) -> str:
        """The step in words, e.g. ``label_flip(fraction=0.1)``."""
        return self.step_kind.words(self.kind, self.config())


def child_key(parent_key: str, step: StepSpec) -> str:
    """First 16 hex chars of the SHA-256 of ``{"parent", "step", "version"}`` as canonical
    JSON: a child is keyed by its parent plus its step (and the step kind's version)."""
    blob = json.dumps({"parent": parent_key, "step": step.dump(),
                       "version": step.step_kind.version},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
