"""The one Registry class and the project's registries.

Every pluggable thing (model, dataset, attack, metric, trial kind) is an entry in exactly one
registry; studies name entries, never code paths. Entries register when their module is
imported: each subpackage's ``__init__`` imports its modules (as timm's ``models/__init__``
does). Each registry names the subpackages that fill it and imports them on its first lookup
(``get``, ``names``, ``in``, ...), so every process (a Ray worker that unpickles a trial
included) sees the same names, while a command that never looks an entry up (``nasrisk
--help``, ``nasrisk studies --show``) never imports torch.

What an entry takes and returns, per registry:

* ``MODELS``: ``builder(*, num_classes: int, input_size: int, **kw) -> nn.Module`` mapping
  *normalised* inputs ``(B, 3, H, W)`` to logits ``(B, num_classes)``. Normalisation to the
  dataset's mean/std is done by :class:`nasrisk.trials.models.wrapper.Normalized`, so attacks
  work in [0, 1] pixel space.
* ``DATASETS``: ``loader(*, root: Path, download: bool) -> ImageData`` (all splits in memory,
  uint8 ``(N, 3, H, W)`` images and int64 labels) with a :class:`DatasetInfo` as ``.info``.
* ``ATTACKS``: an :class:`~nasrisk.trials.attacks.entry.AttackEntry` (the function that runs
  the attack part of an ``attack`` trial ``(model, inputs, common, options, ctx, key) ->
  (metrics, arrays)``, its options model, the metric names it returns, which test inputs it
  attacks, threat model and source); the plain attack functions it wraps
  (``pgd_targeted_case(model, x, y, *, ...) -> AttackResult``) stay callable on their own.
* ``METRICS``: a :class:`~nasrisk.trials.metrics.entry.MetricEntry` (the function
  ``metric(model, ...) -> float | dict | result``, its config model, the names it returns,
  source).
* ``TRIAL_KINDS``: a :class:`~nasrisk.trials.kinds.base.TrialKind` (function
  ``config, ctx -> metrics``, config model, metric names, run naming).
* ``STEP_KINDS``: a lineage step kind (:mod:`nasrisk.trials.lineage`): its typed config and the
  function that makes a child model from its parent.
* ``DEFENSES``: a :class:`~nasrisk.trials.defenses.entry.DefenseEntry` (``run(model, inputs,
  options, ctx, key) -> metrics`` on one trained model, its options model, metric names, source).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator

from .errors import UserError

T = TypeVar("T")


class UnknownEntryError(UserError, KeyError):
    """A name that is not in a registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class Registry(Generic[T]):
    """A name -> object table. Registering a name twice raises; an unknown name raises
    :class:`UnknownEntryError` listing the valid names.

    ``modules`` are the modules whose import registers the entries; they are imported on the
    first lookup (not at ``import nasrisk.trials``), so that importing the package stays cheap.
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.modules = tuple(modules)
        self._loaded = not self.modules
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def _load(self) -> None:
        if self._loaded:
            return
        for m in self.modules:
            importlib.import_module(m)  # registers its entries (a failure propagates, and retries)
        self._loaded = True

    def register(self, name: str, obj: T | None = None, **meta: Any) -> Callable[[T], T] | T:
        """``@REG.register("name", key=value)`` or ``REG.register("name", obj)``.

        ``meta`` is free-form metadata kept beside the entry (family, source, ...).
        """

        def add(o: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = o
            self._meta[name] = dict(meta)
            return o

        if obj is not None:
            return add(obj)
        return add

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries)) or "(none registered)"
            raise UnknownEntryError(f"unknown {self.kind} {name!r}; valid: {valid}") from None

    def validate_name(self, name: str) -> str:
        """``name`` if registered, else ValueError listing the valid names (for pydantic)."""
        self._load()
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return name

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)


MODELS: Registry[Callable[..., Any]] = Registry("model", ("nasrisk.trials.models",))
DATASETS: Registry[Callable[..., Any]] = Registry("dataset", ("nasrisk.trials.data",))
ATTACKS: Registry[Any] = Registry("attack", ("nasrisk.trials.attacks",))  # AttackEntry
METRICS: Registry[Any] = Registry("metric", ("nasrisk.trials.metrics",))  # MetricEntry
TRIAL_KINDS: Registry[Any] = Registry("trial kind", ("nasrisk.trials.kinds",))
STEP_KINDS: Registry[Any] = Registry("step kind", ("nasrisk.trials.steps",))
DEFENSES: Registry[Any] = Registry("defense", ("nasrisk.trials.defenses",))  # DefenseEntry


#: config field types that accept only registered names (validated before Ray starts)
DatasetName = Annotated[str, AfterValidator(DATASETS.validate_name)]
ModelName = Annotated[str, AfterValidator(MODELS.validate_name)]
