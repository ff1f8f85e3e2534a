"""What a trial kind is: a frozen :class:`TrialKind` registered in ``TRIAL_KINDS``.

A trial is a plain function ``fn(config: dict, ctx: TrialContext) -> dict[str, float]``; the
entry carries beside it everything the runner and the plan need to know about it, so nothing
is patched onto the function as attributes:

* ``config_model``: the pydantic model that validates ``config`` (before Ray starts);
* ``metrics``: the names of the metrics the trial returns (``metrics_for`` narrows them to one
  config, e.g. the attack an attack trial runs); a derived stage's ``take: metrics.NAME`` is
  checked against them at plan time, and the registry sweep checks a real run against them;
* ``name`` / ``name_prefix``: the MLflow run name (``"a0042 " + name(cfg)``);
* ``params``: extra MLflow params logged beside the config (the store key, op counts, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class TrialKind:
    """One trial kind (see the module docstring)."""

    fn: Callable[[dict[str, Any], Any], dict[str, float]]
    config_model: type[BaseModel]
    metrics: tuple[str, ...] = ()
    metrics_for: Callable[[Any], tuple[str, ...]] | None = None
    name: Callable[[Any], str] | None = None
    name_prefix: str = ""
    params: Callable[[Any], Mapping[str, Any]] | None = None
    description: str = ""

    def __call__(self, config: dict[str, Any], ctx: Any) -> dict[str, float]:
        return self.fn(config, ctx)

    def validate(self, config: Mapping[str, Any]) -> BaseModel:
        return self.config_model.model_validate(dict(config))

    def trial_name(self, cfg: Any) -> str | None:
        """The run name after the plan's index, or None when the kind names none."""
        return self.name(cfg) if self.name is not None else None

    def extra_params(self, cfg: Any) -> dict[str, Any]:
        """MLflow params logged beside the config (empty when the kind adds none)."""
        return dict(self.params(cfg)) if self.params is not None else {}

    def metric_names(self, cfg: Any | None = None) -> tuple[str, ...]:
        """The metrics a trial of ``cfg`` returns (all the kind may return when None)."""
        if cfg is not None and self.metrics_for is not None:
            return tuple(self.metrics_for(cfg))
        return self.metrics
