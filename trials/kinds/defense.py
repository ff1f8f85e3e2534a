"""The ``defense`` trial (EVAS, ICLR 2023, Tables 4-5; PROTOCOLS 5 (e)): one backdoor defense
(a ``DEFENSES`` entry: ``neural_cleanse``, ``strip``, ``fine_pruning``) on one stored model.

The model is any lineage (:class:`~nasrisk.trials.victims.VictimSpec`): a base, a base plus a
``badnet`` step, a zoo model of the AutoML study; it comes from
:func:`~nasrisk.trials.victims.ensure_victim` (loaded from the store, or made there once).
The defense sees ``n_inputs`` clean test inputs (drawn by ``seed`` alone, the same for every
model of a dataset), the trigger inputs of the model's backdoor, and the victim's clean
training split as the defender's data (:class:`~nasrisk.trials.defenses.entry.DefenseInputs`).

Trigger sources (``trigger.source``, :data:`TRIGGER_SOURCES`):

* ``from_lineage`` (default): the patch of the lineage's last ``badnet`` step (its config is
  the patch spec, kept in every record's ``lineage``); a lineage without one has no known
  trigger: defenses that need one (STRIP) are refused at validation, the others run blind
  (NeuralCleanse then reports the smallest-norm class);
* ``patch``: the patch given in ``trigger.patch`` (e.g. a clean model against the patch its
  backdoored sibling learnt);
* ``none``: no trigger;
* ``generator``: the EVAS input-aware generator, a stored object
  (:mod:`nasrisk.trials.backdoor.evas_store`): ``trigger.generator`` (a
  :class:`~nasrisk.trials.backdoor.evas_store.GeneratorSpec`; ``trained_on`` None: the
  victim itself) is ensured (trained once in the store), or ``trigger.object_key`` names a
  stored one; :func:`~nasrisk.trials.defenses.triggers.generator_trigger` of it.

Options: ``defense_options: {<defense>: {...}}``, each validated with its entry's options
model; only the trial's own defense's options stay in its config (as the attack kind's
``attack_options``), so a stage-wide option of another defense changes no trial key.

Metrics: ``model_acc`` (clean accuracy of the model on the inputs), ``model_asr`` (ASR of the
trigger on them; NaN without one), ``model_trained`` (1 when this trial made the model), then
the entry's :meth:`~nasrisk.trials.defenses.entry.DefenseEntry.metric_names`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from ..attacks.entry import fixed_indices
from ..backdoor.evas_store import GeneratorSpec, ensure_generator, load_generator
from ..context import TrialContext
from ..data import load_dataset
from ..defenses.entry import DefenseEntry, DefenseInputs, accuracy, success_rate
from ..defenses.triggers import PatchTrigger, TriggerInputs, generator_trigger, patch_trigger
from ..registry import DEFENSES, TRIAL_KINDS
from ..steps.badnet import trigger_of
from ..victims import VictimSpec, ensure_victim, victim_data
from .base import TrialKind
from .options import own_options

_COMMON = ("model_acc", "model_asr", "model_trained")


def _is_defense(name: str) -> str:
    return DEFENSES.validate_name(name)


DefenseName = Annotated[str, AfterValidator(_is_defense)]


class TriggerConfig(BaseModel):
    """Where the trigger inputs come from (module docstring): ``source``; ``patch`` for
    ``source: patch``; ``object_key`` (a stored generator) for the future ``generator``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["from_lineage", "patch", "none", "generator"] = "from_lineage"
    patch: PatchTrigger | None = None
    object_key: str | None = None
    generator: GeneratorSpec | None = None

    @model_validator(mode="after")
    def _fields(self) -> TriggerConfig:
        if (self.patch is not None) != (self.source == "patch"):
            raise ValueError("trigger.patch is given exactly when trigger.source is 'patch'")
        if self.source == "generator" and (self.generator is None) == (self.object_key is None):
            raise ValueError("trigger source 'generator' takes one of trigger.generator (a "
                             "generator spec) and trigger.object_key (a stored generator)")
        if self.source not in TRIGGER_SOURCES:
            raise ValueError(f"trigger source {self.source!r} is not built yet (the EVAS "
                             "generator hook: nasrisk.trials.kinds.defense.TRIGGER_SOURCES); "
                             f"valid: {', '.join(TRIGGER_SOURCES)}")
        return self


def _from_lineage(cfg: DefenseConfig, ctx: TrialContext) -> TriggerInputs | None:
    patch = trigger_of(cfg.victim.steps)
    return None if patch is None else patch_trigger(patch)


def _generator(cfg: DefenseConfig, ctx: TrialContext) -> TriggerInputs:
    if cfg.trigger.object_key is not None:
        if ctx.store_root is None:
            raise ValueError("trigger.object_key needs a store")
        gen, target = load_generator(ctx.store_root, cfg.trigger.object_key, ctx.device)
        return generator_trigger(gen, target)
    spec = cfg.trigger.generator
    gen, rec = ensure_generator(spec.trained_on or cfg.victim, spec, ctx)
    return generator_trigger(gen, rec["target"])


#: trigger source -> builder(cfg, ctx) -> TriggerInputs | None; the EVAS generator plugs in
#: here as "generator" (module docstring)
TRIGGER_SOURCES: dict[str, Callable[[Any, TrialContext], TriggerInputs | None]] = {
    "from_lineage": _from_lineage,
    "patch": lambda cfg, ctx: patch_trigger(cfg.trigger.patch),
    "none": lambda cfg, ctx: None,
    "generator": _generator,
}


class DefenseConfig(BaseModel):
    """One defense trial (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    victim: VictimSpec
    defense: DefenseName
    defense_options: dict[str, dict[str, Any]] = {}
    trigger: TriggerConfig = TriggerConfig()
    n_inputs: int = Field(500, ge=1)
    seed: int = 0
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _own_options(self) -> DefenseConfig:
        own = own_options("defense_options", self.defense_options, self.defense,
                          check=_is_defense, model_of=lambda n: DEFENSES.get(n).options)
        object.__setattr__(self, "defense_options", {self.defense: own})
        if self.entry().needs_trigger and not self.has_trigger():
            raise ValueError(f"defense {self.defense} needs trigger inputs, and trigger source "
                             f"{self.trigger.source!r} gives none for this victim (its lineage "
                             "has no badnet step)")
        return self

    def entry(self) -> DefenseEntry:
        return DEFENSES.get(self.defense)

    def options(self) -> BaseModel:
        """This trial's defense's options, typed."""
        return self.entry().options.model_validate(self.defense_options[self.defense])

    def has_trigger(self) -> bool:
        src = self.trigger.source
        return src == "patch" or (src == "from_lineage" and trigger_of(self.victim.steps)
                                  is not None) or src == "generator"


def run_defense(config: dict, ctx: TrialContext) -> dict[str, float]:
    """Run one defense on one stored model (module docstring)."""
    cfg = DefenseConfig.model_validate(config)
    entry = cfg.entry()
    spec = cfg.victim
    full = load_dataset(spec.dataset, root=ctx.data_root, download=ctx.download)
    model, record = ensure_victim(spec, ctx, data=full)
    data = victim_data(spec, ctx, full)
    clean = victim_data(spec.base(), ctx, full)  # the defender's data: labels never poisoned
    idx = fixed_indices(len(data.y_test), cfg.n_inputs, cfg.seed)
    trigger = TRIGGER_SOURCES[cfg.trigger.source](cfg, ctx)
    inputs = DefenseInputs(x=data.x_test[idx], y=data.y_test[idx], trigger=trigger,
                           defender=clean, num_classes=data.info.num_classes, seed=cfg.seed,
                           batch_size=cfg.batch_size)
    model.eval()
    out = {"model_acc": accuracy(model, inputs.clean(), inputs.y, cfg.batch_size),
           "model_asr": success_rate(model, inputs),
           "model_trained": float(record.get("source") == "trained")}
    ctx.progress(f"defense {cfg.defense} on {spec.describe()}"
                 + (f" ({trigger.description})" if trigger is not None else " (no trigger)"))
    metrics = entry.run(model, inputs, cfg.options(), ctx, f"defense/{cfg.defense}")
    declared = entry.metric_names(cfg.options())
    if set(metrics) != set(declared):
        raise RuntimeError(f"defense {cfg.defense!r} returned metrics {sorted(metrics)}, its "
                           f"entry declares {sorted(declared)}")
    return {**out, **{k: float(v) for k, v in metrics.items()}}


def extra_params(cfg: DefenseConfig) -> dict[str, object]:
    """Logged beside the config: the model's lineage key, its parent's key, the lineage in
    words, model, dataset, MODELS family, and the defense (named as study/tags.py's ``P_*``;
    trials/ does not import study/)."""
    return {**cfg.victim.lineage_params(), "defense": cfg.defense}


def trial_name(cfg: DefenseConfig) -> str:
    return f"{cfg.defense} {cfg.victim.model}@{cfg.victim.dataset}"  # "d0003 strip nats@cifar10"


def metric_names(cfg: DefenseConfig) -> tuple[str, ...]:
    return (*_COMMON, *cfg.entry().metric_names(cfg.options()))


def _all_metrics() -> tuple[str, ...]:
    names = [m for n in DEFENSES.names() for m in DEFENSES.get(n).metrics]
    return (*_COMMON, *dict.fromkeys(names))


TRIAL_KINDS.register("defense", TrialKind(
    fn=run_defense, config_model=DefenseConfig, metrics=_all_metrics(),
    metrics_for=metric_names, name=trial_name,
    name_prefix="d", params=extra_params,
    description="one backdoor defense (DEFENSES) on one stored model"))
