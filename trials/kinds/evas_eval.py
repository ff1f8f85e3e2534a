"""The ``evas_eval`` trial (EVAS, Pang et al., ICLR 2023, Tables 1-3 and Figure 6; PROTOCOLS 5
"Evaluation"): a stored trigger generator applied to a stored model -> clean ACC, ASR.

* ``model``: any lineage (:class:`~nasrisk.trials.victims.VictimSpec`): a NATS arch
  (``model: nats``, ``model_kwargs: {arch: ..., C: 16, N: 5}``), ResNet-18 (``model:
  resnet18``), with steps (``fine_tune``, ``trigger_mix``) or not;
* ``generator``: a :class:`~nasrisk.trials.backdoor.evas_store.GeneratorSpec`: the model it
  is trained against (``trained_on``; None: ``model`` itself; a mapping is completed with the
  base fields of ``model`` it does not set, so ``{}`` is ``model``'s base and ``{seed: 0}``
  that base at seed 0, and a study's dataset reaches both) and its config. It is made once
  in the store (:func:`~nasrisk.trials.backdoor.evas_store.ensure_generator`).

The paper's settings are lineages: (a) Table 1: ``trained_on`` None; (b) Table 2, fine-tuning
with the generator fixed: ``model`` = ``trained_on`` + a ``fine_tune`` step; (c) Table 3,
re-training: ``model`` = ``trained_on`` with another ``seed``; (d) Figure 6: ``model`` =
``trained_on`` + a ``trigger_mix`` step.

Metrics: ``acc`` (clean accuracy of ``model`` on ``n_inputs`` test inputs drawn by ``seed``),
``asr`` (fraction of their trigger inputs whose true label is not the target that ``model``
labels the target; :func:`~nasrisk.trials.backdoor.input_aware.attack_success_rate`),
``generator_acc`` / ``generator_asr`` (the trained-on model at generator training time),
``model_trained`` / ``generator_trained`` (1 when this trial made them). Artifact:
``triggers.png`` (clean / trigger / mask of 8 test inputs).

Deviations: none from the paper's measure; ASR excludes target-class inputs (PROTOCOLS 5).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..attacks.entry import fixed_indices
from ..backdoor.evas_store import GeneratorSpec, ensure_generator, generator_key
from ..backdoor.input_aware import attack_success_rate, save_trigger_examples
from ..context import TrialContext
from ..data import dataset_info, load_dataset
from ..registry import MODELS, TRIAL_KINDS
from ..train import evaluate
from ..victims import VictimSpec, ensure_victim, victim_data
from .base import TrialKind

METRICS = ("acc", "asr", "generator_acc", "generator_asr", "model_trained",
           "generator_trained")


class EvasEvalConfig(BaseModel):
    """One evaluation (module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: VictimSpec
    generator: GeneratorSpec = GeneratorSpec()
    n_inputs: int = Field(1000, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)

    @model_validator(mode="before")
    @classmethod
    def _trained_on_from_the_model(cls, data: Any) -> Any:
        # ``trained_on: {seed: 0}`` = the model's base with seed 0; ``{}`` = the model's base
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        gen = data.get("generator")
        if not isinstance(gen, dict) or not isinstance(gen.get("trained_on"), dict):
            return data
        base = {k: v for k, v in data["model"].items() if k not in ("steps", "poison_fraction")}
        return {**data, "generator": {**gen, "trained_on": {**base, **gen["trained_on"]}}}

    @model_validator(mode="after")
    def _same_dataset(self) -> EvasEvalConfig:
        on = self.trained_on()
        if on.dataset != self.model.dataset:
            raise ValueError(f"generator.trained_on is on {on.dataset}, the model on "
                             f"{self.model.dataset}")
        n = dataset_info(self.model.dataset).num_classes
        if self.generator.config.target >= n:
            raise ValueError(f"generator.config.target {self.generator.config.target} is not "
                             f"a class of {self.model.dataset} (classes 0..{n - 1})")
        return self

    def trained_on(self) -> VictimSpec:
        return self.generator.trained_on or self.model


def run_evas_eval(config: dict, ctx: TrialContext) -> dict[str, float]:
    cfg = EvasEvalConfig.model_validate(config)
    full = load_dataset(cfg.model.dataset, root=ctx.data_root, download=ctx.download)
    # the model first: its record says whether this trial made it (the generator's training
    # then loads it from the store when it is the trained-on model)
    model, mrec = ensure_victim(cfg.model, ctx, data=full)
    gen, grec = ensure_generator(cfg.trained_on(), cfg.generator, ctx, full)
    data = victim_data(cfg.model, ctx, full)
    idx = fixed_indices(len(data.y_test), cfg.n_inputs, cfg.seed)
    x, y = data.x_test[idx], data.y_test[idx]
    acc = evaluate(model, x, y, device=ctx.device)
    asr = attack_success_rate(model, gen, x, y, target=cfg.generator.config.target,
                              device=ctx.device)
    save_trigger_examples(gen, x[:8], ctx.artifact_dir / "triggers.png")
    ctx.progress(f"evas_eval {cfg.model.describe()}: acc {acc:.4f} asr {asr:.4f} (generator "
                 f"{grec['key']}, asr {grec['asr']:.4f} at training)")
    return {"acc": float(acc), "asr": float(asr), "generator_acc": float(grec["acc"]),
            "generator_asr": float(grec["asr"]),
            "model_trained": float(mrec.get("source") == "trained"),
            "generator_trained": float(grec["source"] == "computed")}


def extra_params(cfg: EvasEvalConfig) -> dict[str, object]:
    """Logged beside the config, named as study/tags.py's ``P_*`` (trials/ does not import
    study/): the model's lineage key, parent key, lineage in words, model, dataset, family,
    the generator's store key and what it was trained on; ``mix_ratio`` / ``mix_label`` of
    the last ``trigger_mix`` step when there is one."""
    m, on = cfg.model, cfg.trained_on()
    arch = m.model_kwargs.get("arch", "")
    mixes = [s.config() for s in m.steps if s.kind == "trigger_mix"]
    mix = {"mix_ratio": mixes[-1].ratio, "mix_label": mixes[-1].label} if mixes else {}
    return {**mix,"lineage_key": m.key(), "parent_key": m.parent_key(), "lineage": m.describe(),
            "model": m.model, "dataset": m.dataset,
            "family": MODELS.meta(m.model).get("family", ""), "arch": arch,
            "generator_key": generator_key(on, cfg.generator),
            "generator_trained_on": on.key(), "generator_trained_on_lineage": on.describe()}


def trial_name(cfg: EvasEvalConfig) -> str:
    return cfg.model.describe()[:200]


TRIAL_KINDS.register("evas_eval", TrialKind(
    fn=run_evas_eval, config_model=EvasEvalConfig, metrics=METRICS, name=trial_name,
    name_prefix="e", params=extra_params,
    description="a stored EVAS trigger generator applied to a stored model: ACC, ASR"))
