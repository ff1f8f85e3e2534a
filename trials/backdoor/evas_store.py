"""The trained EVAS trigger generator as a stored object (PROTOCOLS 5 "Evaluation"; EVAS,
Pang et al., ICLR 2023, Sec. 5, Tables 1-5).

EVAS evaluates one generator against many models: the model it was trained against (Table 1),
that model fine-tuned (Table 2), a re-training of its arch with another seed (Table 3), a
fine-tuning on data with trigger inputs mixed in (Figure 6), and the defenses (Tables 4-5).
So the generator is trained **once** against the ensured (frozen) model and kept in the
content-addressed store (:func:`~nasrisk.trials.store.ensure_object`, kind ``"generator"``),
keyed by the model's lineage key and the generator's canonical config (plus the training seed
and the number of training images): the same atomic save, lock and checksum guarantees as
models. Every consumer (the ``evas_eval`` trial, the ``trigger_mix`` step, the defense trial's
``generator`` trigger source) names it by a :class:`GeneratorSpec`.

Deviations: none from the generator training itself (:func:`train_generator`); the record's
``acc`` / ``asr`` are those measured at training time on the trained-on model's test subset.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..context import TrialContext
from ..data.base import ImageData
from ..models.generator import TriggerGenerator
from ..store import Store, ensure_object, object_key
from ..victims import VictimSpec, ensure_victim, victim_data
from .input_aware import GeneratorConfig, train_generator

KIND = "generator"
VERSION = "generator/1"  # bump when train_generator changes what it makes


class GeneratorSpec(BaseModel):
    """Which stored generator: the model it is trained against (``trained_on``; None: the
    model of the trial or step that names it), its ``config``, the training ``seed`` and
    ``train_examples`` (the first so many of the model's training images; None: all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trained_on: VictimSpec | None = None
    config: GeneratorConfig = GeneratorConfig()
    seed: int = Field(0, ge=0, lt=2**32)
    train_examples: int | None = Field(None, ge=1)


def generator_identity(model_key: str, spec: GeneratorSpec) -> dict[str, Any]:
    """What determines a trained generator: the model's lineage key, the generator config's
    canonical dump, the seed, the training-image count and :data:`VERSION`."""
    return {"model": model_key, "config": spec.config.model_dump(mode="json"),
            "seed": spec.seed, "train_examples": spec.train_examples, "version": VERSION}


def generator_key(model_spec: VictimSpec, spec: GeneratorSpec) -> str:
    """The store key of the generator ``spec`` trained against ``model_spec``."""
    return object_key(KIND, generator_identity(model_spec.key(), spec))


def _build(payload: dict[str, Any]) -> TriggerGenerator:
    gen = TriggerGenerator(channels=tuple(int(c) for c in payload["channels"]))
    gen.load_state_dict(payload["state_dict"])
    return gen.eval()


def ensure_generator(model_spec: VictimSpec, gcfg: GeneratorConfig | GeneratorSpec,
                     ctx: TrialContext, data: ImageData | None = None,
                     ) -> tuple[TriggerGenerator, dict[str, Any]]:
    """The generator trained against the model of ``model_spec`` (ensured through
    :func:`~nasrisk.trials.victims.ensure_victim`), from the store or trained there once:
    ``(generator (eval mode, on ctx.device), record)``. The record is ensure_object's
    (``key``, ``source`` = ``"store"`` / ``"computed"``, ``run_id``) plus ``acc`` (the model's
    clean accuracy) and ``asr`` at training time, ``best_epoch``, ``train_seconds`` and
    ``model_key``. ``gcfg`` is a :class:`GeneratorConfig` (seed 0, all training images) or a
    full :class:`GeneratorSpec` (its ``trained_on`` is ignored: ``model_spec`` is the
    model). ``data``: the full dataset, to avoid reloading."""
    spec = gcfg if isinstance(gcfg, GeneratorSpec) else GeneratorSpec(config=gcfg)
    model_spec = model_spec.spec()
    mkey = model_spec.key()
    identity = generator_identity(mkey, spec)
    key = object_key(KIND, identity)

    def compute() -> dict[str, Any]:
        model, _ = ensure_victim(model_spec, ctx, data=data)
        d = victim_data(model_spec, ctx, data)
        g = train_generator(model, d.subset(spec.train_examples, None), spec.config,
                            seed=spec.seed, ctx=ctx, state_key=f"generator/{key}")
        ctx.save_state(f"generator/{key}", None)  # the store holds it now
        return {"state_dict": g["generator"].cpu().state_dict(),
                "channels": list(spec.config.channels), "target": spec.config.target,
                "acc": float(g["acc"]), "asr": float(g["asr"]),
                "cross_acc": float(g["cross_acc"]), "best_epoch": int(g["best_epoch"]),
                "seconds": float(g["seconds"])}

    payload, record = ensure_object(ctx.store_root, identity, KIND, compute, ctx,
                                    describe=f"generator target={spec.config.target} seed="
                                             f"{spec.seed} on {model_spec.describe()}")
    gen = _build(payload).to(ctx.device)
    return gen, {**record, "model_key": mkey, "acc": payload["acc"], "asr": payload["asr"],
                 "best_epoch": payload["best_epoch"], "train_seconds": payload["seconds"],
                 "target": payload["target"]}


def load_generator(store_root: str, key: str, device: Any = "cpu") -> tuple[nn.Module, int]:
    """A stored generator by its key (``nasrisk store ls`` lists them): ``(generator,
    target)``; ValueError when the key holds no generator."""
    found = Store(store_root).load(key)
    if found is None or "payload" not in found or found["record"].get("kind") != KIND:
        raise ValueError(f"store {store_root}: no generator under key {key!r}")
    return _build(found["payload"]).to(device), int(found["payload"]["target"])
