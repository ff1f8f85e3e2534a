"""The ``attack`` trial of the AutoML-risks study (PROTOCOLS 4; Pang et al., "On the Security
Risks of AutoML", USENIX Security 2022, Sec. 4, Table 3, Figs. 4-5): one evasion attack on one
victim from the store.

The victim comes from :func:`~nasrisk.trials.victims.ensure_victim`: it is loaded from the
store, or trained there (once, under the store's lock) when no victim trial has made it yet.
The attack is the ``ATTACKS`` entry named by ``attack`` (an
:class:`~nasrisk.trials.attacks.entry.AttackEntry`: ``pgd_targeted``, ``pgd_sweep``, ``nes``,
``pgd_overlap``, ...); this module only wires it to the victim, the inputs and the runner, so
a new attack needs no edit here.

Metrics: the entry's :attr:`~nasrisk.trials.attacks.entry.AttackEntry.metrics`, plus always
``victim_acc``, ``n_attacked`` (inputs the attack ran on) and ``victim_trained`` (1 when this
trial had to train the victim).

Inputs: by the entry's rule (:mod:`nasrisk.trials.attacks.entry`): ``"correct"`` =
``n_inputs`` random *correctly classified* test inputs chosen by ``seed`` (PROTOCOLS 4), so
the PGD and NES trials of one victim and seed attack the same inputs with the same targets;
``"fixed"`` = ``n_inputs`` test indices drawn by ``seed`` alone (the same for every model of a
dataset at the same test-split size), with the victim's clean verdicts, for ``pgd_overlap``.

Options: ``attack_options: {<attack>: {...}}`` holds per-attack options, each validated with
its entry's ``options`` model (an unknown attack name or option is an error for every trial);
only the trial's own attack's options stay in its validated config, so a stage-wide NES option
neither changes the PGD trials' keys (no rerun) nor shows up among their MLflow params.
``nes_queries_per_estimate: q`` is accepted as ``attack_options: {nes: {queries_per_estimate:
q}}`` (older study files); given beside ``attack_options``, it wins (a profile that sets it
overrides the stage's value). A trial of ``pgd_targeted``, ``pgd_sweep``, ``nes`` or
``pgd_overlap`` dumps (trial key, MLflow params) as before ``attack_options`` existed, with the
flat ``nes_queries_per_estimate`` (None outside NES), so existing workdirs keep their keys.

For PGD and NES an input succeeds when any iterate within the maximum iterations reaches the
target (Pang et al. 2022, Sec. 3.2) and is kept at its first success. Each finished part (a
PGD case, an NES case, the sweep) is saved through ``ctx.save_state``, so a retried trial does
not redo it. Every trial writes the entry's ``.npz`` artifact (``<attack>.npz``; ``overlap.npz``
for ``pgd_overlap``): ``indices`` into the test split, ``correct`` for fixed inputs, and the
entry's per-input arrays (success masks, targets, query counts).

Deviations: the protocol runs the eps sweep and the overlap study on CIFAR10 only; the trial
accepts any dataset (the study chooses). ``params`` defaults to the victim's parameter set;
set it explicitly to attack one victim with both settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_serializer,
    model_validator,
)

from ..attacks.entry import AttackCommon, AttackEntry, AttackInputs, fixed_indices
from ..attacks.targets import clean_logits, select_correct
from ..context import TrialContext
from ..data import ImageData, load_dataset, to_float
from ..registry import ATTACKS, TRIAL_KINDS
from ..victims import VictimSpec, ensure_victim, victim_data
from .base import TrialKind
from .options import own_options


def attack_names() -> list[str]:
    """The ATTACKS entries an attack trial can run (every :class:`AttackEntry`)."""
    return [n for n in ATTACKS.names() if isinstance(ATTACKS.get(n), AttackEntry)]


def _is_attack(name: str) -> str:
    if name not in ATTACKS or not isinstance(ATTACKS.get(name), AttackEntry):
        raise ValueError(f"unknown attack {name!r}; valid: {', '.join(attack_names())}")
    return name


AttackName = Annotated[str, AfterValidator(_is_attack)]
_COMMON = ("victim_acc", "victim_trained", "n_attacked")
# the attacks of before attack_options: their trials dump as then (see AttackConfig._dump)
_LEGACY = ("pgd_targeted", "pgd_sweep", "nes", "pgd_overlap")


class AttackConfig(BaseModel):
    """One attack trial (see the module docstring for ``attack_options``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    victim: VictimSpec
    attack: AttackName
    n_inputs: int = Field(1000, ge=1)
    params: Literal["paper", "artifact"] = "paper"
    seed: int = 0
    batch_size: int = Field(256, ge=1)
    attack_options: dict[str, dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _sugar(cls, data: Any) -> Any:
        # the flat NES field of older study files -> attack_options.nes
        if isinstance(data, dict) and "nes_queries_per_estimate" in data:
            data = dict(data)
            q = data.pop("nes_queries_per_estimate")
            opts = dict(data.get("attack_options") or {})
            if q is not None:
                opts["nes"] = {**dict(opts.get("nes") or {}), "queries_per_estimate": q}
            data["attack_options"] = opts
        return data

    @model_validator(mode="before")
    @classmethod
    def _params_from_victim(cls, data: Any) -> Any:
        # "params: same as the victim's" unless given: one parameter set per trial chain
        if isinstance(data, dict) and "params" not in data:
            v = data.get("victim")
            p = v.get("params") if isinstance(v, dict) else getattr(v, "params", None)
            if p is not None:
                data = {**data, "params": p}
        return data

    @model_validator(mode="after")
    def _own_options(self) -> AttackConfig:
        # every attack's options are checked (a typo fails in every trial of the stage), then
        # only this trial's attack's options are kept, with their defaults filled in
        own = own_options("attack_options", self.attack_options, self.attack,
                          check=_is_attack, model_of=lambda n: ATTACKS.get(n).options)
        object.__setattr__(self, "attack_options", {self.attack: own})
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        # trial keys hash this dump: a trial of an attack that existed before attack_options,
        # with no option but NES's queries_per_estimate, dumps as it did then (the flat
        # ``nes_queries_per_estimate``, None outside NES), so an existing workdir's attack
        # trials keep their keys and are not rerun. The dump validates back to the same config.
        d = handler(self)
        own = self.attack_options[self.attack]
        if self.attack in _LEGACY and set(own) <= {"queries_per_estimate"}:
            d.pop("attack_options")
            d["nes_queries_per_estimate"] = own.get("queries_per_estimate")
        return d

    def entry(self) -> AttackEntry:
        return ATTACKS.get(self.attack)

    def options(self) -> BaseModel:
        """This trial's attack's options, typed."""
        return self.entry().options.model_validate(self.attack_options[self.attack])


def select_inputs(entry: AttackEntry, model: Any, data: ImageData,
                  cfg: AttackConfig) -> AttackInputs:
    """The inputs of ``entry``'s rule (module docstring) from the victim's test split."""
    if entry.inputs == "fixed":
        idx = fixed_indices(len(data.y_test), cfg.n_inputs, cfg.seed)
        x, y = to_float(data.x_test[idx]), data.y_test[idx]
        correct = clean_logits(model, x, cfg.batch_size).argmax(1) == y
        return AttackInputs(x=x, y=y, indices=idx.long(), correct=correct.bool())
    x, y, idx = select_correct(model, data.x_test, data.y_test, cfg.n_inputs, cfg.seed)
    return AttackInputs(x=x, y=y, indices=idx.long(),
                        correct=torch.ones(len(idx), dtype=torch.bool))


def run_attack(config: dict, ctx: TrialContext) -> dict[str, float]:
    """Run one attack of PROTOCOLS 4 on one victim (see the module docstring)."""
    cfg = AttackConfig.model_validate(config)
    entry = cfg.entry()
    spec = cfg.victim
    full = load_dataset(spec.dataset, root=ctx.data_root, download=ctx.download)
    model, record = ensure_victim(spec, ctx, data=full)
    data = victim_data(spec, ctx, full)  # the test split the victim's acc is measured on
    model.eval()
    inputs = select_inputs(entry, model, data, cfg)
    n = int(inputs.correct.sum())
    if entry.inputs == "correct":
        ctx.progress(f"{cfg.attack}: {n} correctly classified inputs (asked {cfg.n_inputs})")
    common = AttackCommon(params=cfg.params, seed=cfg.seed, batch_size=cfg.batch_size)
    metrics, arrays = entry.run(model, inputs, common, cfg.options(), ctx,
                                f"attack/{cfg.attack}")
    if set(metrics) != set(entry.metrics):
        raise RuntimeError(f"attack {cfg.attack!r} returned metrics {sorted(metrics)}, its "
                           f"entry declares {sorted(entry.metrics)}")
    out: dict[str, float] = {"victim_acc": float(record["acc"]),
                             "victim_trained": float(record.get("source") == "trained"),
                             "n_attacked": float(n), **metrics}
    head = {"indices": inputs.indices}
    if entry.inputs == "fixed":
        head["correct"] = inputs.correct
    arrays = {**head, **arrays}
    np.savez(ctx.artifact_dir / entry.artifact_name(cfg.attack),
             **{k: v.numpy() for k, v in arrays.items()})
    return out


def extra_params(cfg: AttackConfig) -> dict[str, object]:
    """Logged beside the config, so the report groups runs and finds the attacked model
    without parsing nested keys (and the runner links the run to the model's): the victim's
    lineage key, its parent's key ("" for a base), the lineage in words, its label-flip
    fraction, model, dataset, MODELS family, and the attack (named as study/tags.py's ``P_*``)."""
    return {**cfg.victim.lineage_params(), "attack": cfg.attack}


def trial_name(cfg: AttackConfig) -> str:
    return f"{cfg.attack} {cfg.victim.model}@{cfg.victim.dataset}"  # "x0007 pgd darts@cifar10"


def metric_names(cfg: AttackConfig) -> tuple[str, ...]:
    return (*_COMMON, *cfg.entry().metrics)


def _all_metrics() -> tuple[str, ...]:
    names = [m for n in attack_names() for m in ATTACKS.get(n).metrics]
    return (*_COMMON, *dict.fromkeys(names))


TRIAL_KINDS.register("attack", TrialKind(
    fn=run_attack, config_model=AttackConfig,
    metrics=_all_metrics(),
    metrics_for=metric_names, name=trial_name, name_prefix="x", params=extra_params,
    description="one evasion attack on one victim from the store"))
