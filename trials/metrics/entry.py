"""What a ``METRICS`` entry is: a frozen :class:`MetricEntry` beside the metric's function, so
a study (or the registry sweep) can run any registered measurement by name with a validated
config and get named scalars back. Callers that know the function keep calling it directly.

* ``fn``: the measurement, called ``fn(**inputs, **config)``;
* ``takes``: the names of ``fn``'s inputs (models, model builders, data), e.g. ``("model",
  "x", "y")``; everything else ``fn`` takes is ``config``;
* ``config``: a pydantic model (extra keys forbidden) of ``fn``'s keyword options with the
  function's own defaults (the registry sweep checks that they agree);
* ``metrics``: the names :meth:`MetricEntry.measure` returns at the default config
  (``metrics_for`` narrows them to one config, e.g. kappa's variants);
* ``summarize``: raw result -> named scalars (None: a float is the one declared name, a dict
  is already named);
* ``source``: the paper / protocol section it follows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class MetricEntry:
    """One measurement (see the module docstring)."""

    fn: Callable[..., Any]
    config: type[BaseModel]
    takes: tuple[str, ...]
    metrics: tuple[str, ...]
    metrics_for: Callable[[Any], tuple[str, ...]] | None = None
    summarize: Callable[[Any], dict[str, float]] | None = None
    source: str = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def validate(self, config: Mapping[str, Any] | BaseModel | None = None) -> BaseModel:
        if isinstance(config, self.config):
            return config
        return self.config.model_validate(dict(config or {}))

    def metric_names(self, config: Mapping[str, Any] | BaseModel | None = None
                     ) -> tuple[str, ...]:
        """The names :meth:`measure` returns for ``config`` (the default config when None)."""
        if self.metrics_for is None:
            return self.metrics
        return tuple(self.metrics_for(self.validate(config)))

    def measure(self, inputs: Mapping[str, Any],
                config: Mapping[str, Any] | BaseModel | None = None) -> dict[str, float]:
        """``fn(**inputs, **config)`` as named scalars (:meth:`metric_names`)."""
        missing = [t for t in self.takes if t not in inputs]
        extra = [k for k in inputs if k not in self.takes]
        if missing or extra:
            raise TypeError(f"inputs must be {self.takes}: missing {missing}, unexpected {extra}")
        cfg = self.validate(config)
        raw = self.fn(**inputs, **{k: getattr(cfg, k) for k in type(cfg).model_fields})
        if self.summarize is not None:
            return self.summarize(raw)
        if isinstance(raw, Mapping):
            return {k: float(v) for k, v in raw.items()}
        names = self.metric_names(cfg)
        if len(names) != 1 or not isinstance(raw, float | int):
            raise TypeError(f"{self.fn.__name__} returned {type(raw).__name__}; give the entry a "
                            "summarize function")
        return {names[0]: float(raw)}

