"""Victims of the AutoML security study: train each (model, dataset, parameter set, poison
fraction, seed) once, keep it in the content-addressed store, and hand it to every attack
(PROTOCOLS 4 "Train each victim once"; Pang et al., "On the Security Risks of AutoML", USENIX
Security 2022, Sec. 4-5).

* :class:`VictimSpec` names a victim; :meth:`VictimSpec.key` hashes everything that determines
  its weights, so equal keys mean interchangeable victims.
* :func:`build_victim` builds the untrained network, normalisation included, so attacks work in
  [0, 1] pixel space (PROTOCOLS 2).
* :func:`ensure_victim` loads the victim from the store, or trains it with the one training loop
  (epoch checkpoints through the trial context) and stores it; a file lock makes concurrent
  callers for one key train it once.

Deviations: ``max_test_examples`` is not part of the key, since the test set never touches the
weights; a stored victim asked for with another test subset is loaded and re-evaluated on the
caller's test set (the returned ``acc`` is always on the test set the caller uses).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .context import TrialContext
from .data import dataset_info, load_dataset
from .data.base import ImageData
from .models.wrapper import Normalized
from .poison.label_flip import flip_labels
from .registry import MODELS, DatasetName, ModelName
from .store import VictimStore
from .train import DARTS_ARTIFACT, DARTS_PAPER, TrainConfig, evaluate, train

KEY_VERSION = "victim/2"  # bump when training code changes what a spec's weights are
# victim/2: float32 by default (was bf16 autocast on CUDA), DARTS auxiliary-head loss
_RESERVED = ("num_classes", "input_size", "params")


def is_darts_space(model: str) -> bool:
    """Whether ``model`` is a DARTS-space network (built from a genotype; takes ``params``)."""
    return "genotype" in MODELS.meta(model)


class VictimSpec(BaseModel):
    """One victim (PROTOCOLS 1.3, 3, 4). ``train=None`` resolves to the parameter set's recipe
    (:data:`~nasrisk.trials.train.DARTS_PAPER` / :data:`~nasrisk.trials.train.DARTS_ARTIFACT`);
    ``poison_fraction`` flips that fraction of training labels (label-flip poisoning, seeded
    by ``seed``); ``max_*_examples`` shrink the data at the `smoke` profile. ``amp`` is the
    training precision ("off" = float32, the default; "bf16"; PROTOCOLS 3), applied to the
    recipe; unset, it is ``train.amp`` when ``train`` is given, else "off"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName
    model_kwargs: dict[str, int | float | str] = {}
    dataset: DatasetName = "cifar10"
    params: Literal["paper", "artifact"] = "paper"
    train: TrainConfig | None = None
    poison_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
    max_train_examples: int | None = Field(None, ge=1)
    max_test_examples: int | None = Field(None, ge=1)
    amp: Literal["off", "bf16"] = "off"

    @model_validator(mode="before")
    @classmethod
    def _one_amp(cls, data: Any) -> Any:
        # one precision for the spec and its recipe: ``amp`` if given, else ``train.amp``
        if not isinstance(data, dict):
            return data
        train, amp = data.get("train"), data.get("amp")
        if amp is None:
            amp = (train.amp if isinstance(train, TrainConfig)
                   else train.get("amp") if isinstance(train, dict) else None)
        if isinstance(amp, bool):
            amp = "bf16" if amp else "off"
        if amp is None:
            return data
        data = {**data, "amp": amp}
        if isinstance(train, dict):
            data["train"] = {**train, "amp": amp}
        elif isinstance(train, TrainConfig) and train.amp != amp:
            data["train"] = train.model_copy(update={"amp": amp})
        return data

    @model_validator(mode="after")
    def _kwargs(self) -> VictimSpec:
        bad = [k for k in self.model_kwargs if k in _RESERVED]
        if bad:
            raise ValueError(f"model_kwargs may not set {bad}: they come from the dataset and "
                             "the `params` field")
        sig = inspect.signature(MODELS.get(self.model))
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            unknown = [k for k in self.model_kwargs if k not in sig.parameters]
            if unknown:
                valid = sorted(set(sig.parameters) - set(_RESERVED))
                raise ValueError(f"model {self.model!r} takes no {unknown}; valid model_kwargs: "
                                 f"{valid or 'none'}")
        return self

    def resolved_train(self) -> TrainConfig:
        """The training recipe: ``train`` if set, else the parameter set's (PROTOCOLS 3), at
        the spec's ``amp``."""
        base = self.train or (DARTS_PAPER if self.params == "paper" else DARTS_ARTIFACT)
        return base if base.amp == self.amp else base.model_copy(update={"amp": self.amp})

    def identity(self) -> dict[str, Any]:
        """Everything that determines the weights, in canonical JSON-able form (only
        VictimSpec's own fields, so a subclass's extra options never change the key)."""
        d = {k: getattr(self, k) for k in VictimSpec.model_fields if k != "max_test_examples"}
        d["train"] = self.resolved_train().model_dump(mode="json")
        d["model_kwargs"] = dict(sorted(self.model_kwargs.items()))
        d["version"] = KEY_VERSION
        return d

    def key(self) -> str:
        """First 16 hex chars of the SHA-256 of :meth:`identity` as canonical JSON."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def spec(self) -> VictimSpec:
        """This spec as a plain :class:`VictimSpec` (drops a subclass's extra fields)."""
        return VictimSpec(**{k: getattr(self, k) for k in VictimSpec.model_fields})


def build_victim(spec: VictimSpec) -> nn.Module:
    """The untrained victim: ``Normalized(MODELS[spec.model](...), mean, std)`` for the
    dataset's classes, size and statistics; DARTS-space models also get ``params``. Its
    initial weights depend only on ``spec.seed`` (the global RNG is forked, not changed)."""
    info = dataset_info(spec.dataset)
    kwargs: dict[str, Any] = dict(spec.model_kwargs)
    if is_darts_space(spec.model):
        kwargs["params"] = spec.params
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = MODELS.get(spec.model)(num_classes=info.num_classes, input_size=info.image_size,
                                     **kwargs)
    return Normalized(net, info.mean, info.std)


def victim_data(spec: VictimSpec, ctx: TrialContext, data: ImageData | None = None) -> ImageData:
    """The victim's dataset (loaded through ``ctx`` unless given), cut to the spec's sizes."""
    if data is None:
        data = load_dataset(spec.dataset, root=ctx.data_root, download=ctx.download)
    elif data.info.name != spec.dataset:
        raise ValueError(f"data is {data.info.name!r} but the victim is on {spec.dataset!r}")
    return data.subset(spec.max_train_examples, spec.max_test_examples)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _train_victim(spec: VictimSpec, ctx: TrialContext, data: ImageData, key: str,
                  ) -> tuple[nn.Module, dict[str, Any]]:
    model = build_victim(spec)
    labels = None
    if spec.poison_fraction > 0:
        labels = flip_labels(data.y_train, fraction=spec.poison_fraction,
                             num_classes=data.info.num_classes, seed=spec.seed)
    cfg = spec.resolved_train()
    ctx.progress(f"victim {key}: training {spec.model} on {spec.dataset} "
                 f"({cfg.epochs} epochs, p={spec.poison_fraction:g})")
    res = train(model, data, cfg, seed=spec.seed, ctx=ctx, state_key=f"victim/{key}",
                labels=labels, metric_prefix="victim_")
    record = {
        "key": key, "acc": float(res["test_acc"]), "seconds": float(res["seconds"]),
        "train_loss": float(res["train_loss"]), "epochs": cfg.epochs,
        "n_train": len(data.y_train), "n_test": len(data.y_test),
        "param_count": param_count(model), "spec": spec.spec().model_dump(mode="json"),
        "trained_at": time.time(),
    }
    return model, record


def ensure_victim(spec: VictimSpec, ctx: TrialContext, *, data: ImageData | None = None,
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """The trained victim of ``spec`` (eval mode, on ``ctx.device``) and its record
    ``{"key", "acc", "seconds", "train_loss", "epochs", "n_train", "n_test", "param_count",
    "spec", "trained_at", "source"}``; ``source`` is ``"store"`` when loaded and ``"trained"``
    when this call trained it.

    Under the store's lock for the key: load from ``ctx.store_root``; if absent (or corrupt:
    reported in one line through ``ctx.warn`` and deleted), train with label-flipped labels when
    ``poison_fraction > 0`` (:func:`~nasrisk.trials.poison.label_flip.flip_labels`), with
    epoch checkpoints in ``ctx`` under ``"victim/<key>"`` (a retried trial resumes), then save
    atomically. Concurrent callers for one key wait for the lock and load, so a victim is
    trained once. ``data`` (the full dataset, to avoid reloading) is cut to the spec's sizes.
    With ``ctx.store_root`` None nothing is stored and only ``ctx``'s state is reused.
    """
    spec = spec.spec()
    key = spec.key()
    if ctx.store_root is None:
        model, record = _train_victim(spec, ctx, victim_data(spec, ctx, data), key)
        return model.to(ctx.device).eval(), {**record, "source": "trained"}

    store = VictimStore(ctx.store_root)
    with store.lock(key, on_wait=ctx.progress):
        found = store.load(key, report=ctx.warn)
        if found is None:
            model, record = _train_victim(spec, ctx, victim_data(spec, ctx, data), key)
            store.save(key, model.state_dict(), record)
            # the store holds the weights now; drop the trial's copy from its checkpoints
            ctx.save_state(f"victim/{key}", None)
            ctx.progress(f"victim {key}: stored, acc {record['acc']:.4f}")
            return model.to(ctx.device).eval(), {**record, "source": "trained"}

    model = build_victim(spec)
    model.load_state_dict(found["state_dict"])
    model.to(ctx.device).eval()
    record = {**found["record"], "source": "store"}
    if data is not None or spec.max_test_examples != record["spec"].get("max_test_examples"):
        test = victim_data(spec, ctx, data)
        if len(test.y_test) != record["n_test"]:  # another test subset: measure on this one
            record["acc"] = evaluate(model, test.x_test, test.y_test, device=ctx.device)
            record["n_test"] = len(test.y_test)
    ctx.progress(f"victim {key}: loaded from the store, acc {record['acc']:.4f}")
    return model, record
