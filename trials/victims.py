"""Victims and their lineages: train each base model (model, dataset, parameter set, seed)
once, derive models from models by registered steps (label flipping, fine-tuning, ...), keep
every one in the content-addressed store and hand it to every attack (PROTOCOLS 4 "Train each
victim once"; Pang et al., "On the Security Risks of AutoML", USENIX Security 2022, Sec. 4-5;
the lineage model: :mod:`nasrisk.trials.lineage`).

* :class:`VictimSpec` names a model: a base plus ``steps``; :meth:`VictimSpec.key` hashes
  everything that determines its weights, so equal keys mean interchangeable models.
* :func:`build_victim` builds the untrained network, normalisation included, so attacks work in
  [0, 1] pixel space (PROTOCOLS 2).
* :func:`ensure_victim` loads the model from the store, or makes it (the base with the one
  training loop, each step by its kind, parents first) and stores it; file locks make
  concurrent callers for one key make it once.

Deviations: ``max_test_examples`` is not part of the key, since the test set never touches the
weights; a stored victim asked for with another test subset is loaded and re-evaluated on the
caller's test set (the returned ``acc`` is always on the test set the caller uses).
``poison_fraction: p`` (p > 0) is accepted as shorthand for a first step
``{kind: label_flip, fraction: p}`` and a spec whose steps are exactly that (or none) dumps
in that shorthand, so study grids over ``poison_fraction``, the trial keys of existing studies
and their MLflow params stay as they were.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from torch import nn

from .context import TrialContext
from .data import dataset_info, load_dataset
from .data.base import ImageData
from .lineage import StepSpec, child_key
from .models.wrapper import Normalized
from .registry import MODELS, DatasetName, ModelName
from .store import Store
from .train import DARTS_ARTIFACT, DARTS_PAPER, TrainConfig, evaluate, train

KEY_VERSION = "victim/2"  # bump when training code changes what a base spec's weights are
# victim/2: float32 by default (was bf16 autocast on CUDA), DARTS auxiliary-head loss
_RESERVED = ("num_classes", "input_size", "params")
#: the fields of the base (what the victim key of before hashed, less the poison fraction)
BASE_FIELDS = ("model", "model_kwargs", "dataset", "params", "train", "seed",
               "max_train_examples", "max_test_examples", "amp")


def is_darts_space(model: str) -> bool:
    """Whether ``model`` is a DARTS-space network (built from a genotype; takes ``params``)."""
    meta = MODELS.meta(model)
    return bool(meta.get("darts_space")) or "genotype" in meta


class VictimSpec(BaseModel):
    """One model (PROTOCOLS 1.3, 3, 4): a base and an ordered tuple of ``steps``
    (:class:`~nasrisk.trials.lineage.StepSpec`, e.g. ``{kind: label_flip, fraction: 0.1}``).
    ``train=None`` resolves to the parameter set's recipe
    (:data:`~nasrisk.trials.train.DARTS_PAPER` / :data:`~nasrisk.trials.train.DARTS_ARTIFACT`);
    ``max_*_examples`` shrink the data at the `smoke` profile. ``amp`` is the training
    precision ("off" = float32, the default; "bf16"; PROTOCOLS 3), applied to the recipe;
    unset, it is ``train.amp`` when ``train`` is given, else "off". ``poison_fraction: p``
    in the input is a first ``label_flip`` step of fraction p (none for p = 0); read back, it
    is the lineage's label-flip fraction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName
    model_kwargs: dict[str, int | float | str] = {}
    dataset: DatasetName = "cifar10"
    params: Literal["paper", "artifact"] = "paper"
    train: TrainConfig | None = None
    steps: tuple[StepSpec, ...] = ()
    seed: int = 0
    max_train_examples: int | None = Field(None, ge=1)
    max_test_examples: int | None = Field(None, ge=1)
    amp: Literal["off", "bf16"] = "off"

    @model_validator(mode="before")
    @classmethod
    def _poison_fraction_is_a_step(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "poison_fraction" not in data:
            return data
        data = dict(data)
        p = data.pop("poison_fraction")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"poison_fraction must be a number in [0, 1), got {p!r}")
        if p > 0:
            data["steps"] = [{"kind": "label_flip", "fraction": float(p)},
                             *(data.get("steps") or ())]
        return data

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
        for i, step in enumerate(self.steps):
            if i > 0 and step.step_kind.first_only:
                raise ValueError(f"step {i + 1} ({step.kind}) trains from the base alone, so it "
                                 "can only be the first step")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a lineage that the shorthand says (no steps, or one label flip) dumps in it, so the
        # dumps (trial keys, MLflow params) of studies written before steps existed are kept
        d = handler(self)
        fraction = self._shorthand()
        if fraction is None:
            return d
        out: dict[str, Any] = {}
        for k, v in d.items():
            if k == "steps":
                out["poison_fraction"] = fraction
            else:
                out[k] = v
        return out

    def _shorthand(self) -> float | None:
        if not self.steps:
            return 0.0
        if (len(self.steps) == 1 and self.steps[0].kind == "label_flip"
                and self.steps[0].config().fraction > 0):
            return float(self.steps[0].config().fraction)
        return None

    # -- the lineage --------------------------------------------------------------------------
    @property
    def poison_fraction(self) -> float:
        """The lineage's label-flip fraction (0.0 without a ``label_flip`` step)."""
        return float(sum(s.config().fraction for s in self.steps if s.kind == "label_flip"))

    def base(self) -> VictimSpec:
        """The base model of the lineage (no steps)."""
        return self.spec().model_copy(update={"steps": ()})

    def parent(self) -> VictimSpec | None:
        """The lineage without its last step, or None for a base."""
        if not self.steps:
            return None
        return self.spec().model_copy(update={"steps": self.steps[:-1]})

    def parent_key(self) -> str:
        """The parent's key; "" for a base."""
        parent = self.parent()
        return parent.key() if parent is not None else ""

    def describe(self) -> str:
        """The lineage in words: ``"darts@cifar10 -> label_flip(fraction=0.1)"`` (the base
        seed is named when it is not 0: ``"darts@cifar10 seed=1"``)."""
        base = f"{self.model}@{self.dataset}" + (f" seed={self.seed}" if self.seed else "")
        return " -> ".join([base, *(s.describe() for s in self.steps)])

    def lineage_params(self) -> dict[str, Any]:
        """What a trial on this model logs beside its config, named as study/tags.py's
        ``P_*`` (trials/ does not import study/; test_registry_sweep checks they agree): the
        lineage key, the parent's key ("" for a base), the lineage in words, the label-flip
        fraction, model, dataset and MODELS family."""
        return {"lineage_key": self.key(), "parent_key": self.parent_key(),
                "lineage": self.describe(), "poison_fraction": self.poison_fraction,
                "model": self.model, "dataset": self.dataset,
                "family": MODELS.meta(self.model).get("family", "")}

    def lineage(self) -> list[dict[str, Any]]:
        """The base's identity, then each step's canonical dump."""
        return [self.identity(), *(s.dump() for s in self.steps)]

    def resolved_train(self) -> TrainConfig:
        """The training recipe: ``train`` if set, else the parameter set's (PROTOCOLS 3), at
        the spec's ``amp``."""
        base = self.train or (DARTS_PAPER if self.params == "paper" else DARTS_ARTIFACT)
        return base if base.amp == self.amp else base.model_copy(update={"amp": self.amp})

    def identity(self, *, poison_fraction: float = 0.0) -> dict[str, Any]:
        """Everything that determines the base's weights, in canonical JSON-able form (only
        the base fields, so a subclass's extra options never change the key). It is the
        victim identity of before steps existed, whose ``poison_fraction`` is 0 for every
        base (``poison_fraction`` > 0 gives a legacy poisoned victim's, see
        :meth:`legacy_key`)."""
        d: dict[str, Any] = {k: getattr(self, k) for k in BASE_FIELDS if k != "max_test_examples"}
        d["train"] = self.resolved_train().model_dump(mode="json")
        d["model_kwargs"] = dict(sorted(self.model_kwargs.items()))
        d["poison_fraction"] = poison_fraction
        d["version"] = KEY_VERSION
        return d

    def key(self) -> str:
        """The lineage key. A base: the first 16 hex chars of the SHA-256 of
        :meth:`identity` as canonical JSON (the victim key of before); a child:
        :func:`~nasrisk.trials.lineage.child_key` of its parent's key and its last step."""
        if not self.steps:
            return _hash(self.identity())
        return child_key(self.parent_key(), self.steps[-1])

    def legacy_key(self) -> str | None:
        """The key this model had when the poison fraction was a field (a base plus one
        ``label_flip`` step), else None: a stored entry under it is migrated on first use."""
        fraction = self._shorthand()
        return _hash(self.identity(poison_fraction=fraction)) if fraction else None

    def spec(self) -> VictimSpec:
        """This spec as a plain :class:`VictimSpec` (drops a subclass's extra fields)."""
        if type(self) is VictimSpec:
            return self
        return VictimSpec(**{k: getattr(self, k) for k in VictimSpec.model_fields})


def _hash(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_victim(spec: VictimSpec) -> nn.Module:
    """The untrained network of ``spec``'s base: ``Normalized(MODELS[spec.model](...), mean,
    std)`` for the dataset's classes, size and statistics; DARTS-space models also get
    ``params``. Its initial weights depend only on ``spec.seed`` (the global RNG is forked,
    not changed). A lineage member's network: :func:`build_model`."""
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


def build_model(spec: VictimSpec) -> nn.Module:
    """The untrained network of a lineage member: the nearest step kind's ``build`` (a
    replica of another architecture, say) walking back from the last step, else the base's
    :func:`build_victim`."""
    for step in reversed(spec.steps):
        if step.step_kind.build is not None:
            return step.step_kind.build(spec)
    return build_victim(spec)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_state_key(spec: VictimSpec) -> str:
    """Where the trial's resumable state of making ``spec`` lives (``ctx.save_state``)."""
    return f"victim/{spec.key()}" if not spec.steps else f"model/{spec.key()}"


def _train_base(spec: VictimSpec, ctx: TrialContext, data: ImageData, key: str,
                ) -> tuple[nn.Module, dict[str, Any]]:
    model = build_victim(spec)
    cfg = spec.resolved_train()
    ctx.progress(f"model {key}: training {spec.model} on {spec.dataset} ({cfg.epochs} epochs)")
    res = train(model, data, cfg, seed=spec.seed, ctx=ctx, state_key=model_state_key(spec),
                metric_prefix="victim_")
    record = {"acc": float(res["test_acc"]), "seconds": float(res["seconds"]),
              "train_loss": float(res["train_loss"]), "epochs": cfg.epochs,
              "step_kind": "", "parent_sha256": None, "metrics": {"acc": float(res["test_acc"])}}
    return model, record


def _apply_step(spec: VictimSpec, ctx: TrialContext, data: ImageData, key: str,
                parent: tuple[nn.Module | None, dict[str, Any], str | None] | None,
                ) -> tuple[nn.Module, dict[str, Any]]:
    step = spec.steps[-1]
    sk = step.step_kind
    ctx.progress(f"model {key}: {spec.describe()}")
    pm, prec, psha = parent if parent is not None else (None, None, None)
    t0 = time.perf_counter()
    # the step may change the parent's network in place: give it a copy
    model, metrics = sk.apply(copy.deepcopy(pm) if pm is not None else None, prec, spec, data,
                              ctx)
    if set(metrics) != set(sk.metrics):
        raise RuntimeError(f"step kind {step.kind} returned metrics {sorted(metrics)}, it "
                           f"declares {sorted(sk.metrics)}")
    metrics = {k: float(v) for k, v in metrics.items()}
    record = {"acc": metrics[sk.acc_metric], "seconds": time.perf_counter() - t0,
              "train_loss": None, "epochs": None, "step_kind": step.kind,
              "parent_sha256": psha if sk.uses_parent else None, "metrics": metrics}
    return model, record


def _make(spec: VictimSpec, ctx: TrialContext, data: ImageData, key: str,
          parent: tuple[nn.Module | None, dict[str, Any], str | None] | None,
          ) -> tuple[nn.Module, dict[str, Any]]:
    """Train the base or apply the last step; the full record but ``run_id``."""
    if spec.steps:
        model, record = _apply_step(spec, ctx, data, key, parent)
    else:
        model, record = _train_base(spec, ctx, data, key)
    record = {"kind": "model", "key": key, "parent_key": spec.parent_key(),
              "describe": spec.describe(), "lineage": spec.lineage(), **record,
              "n_train": len(data.y_train), "n_test": len(data.y_test),
              "param_count": param_count(model), "spec": spec.model_dump(mode="json"),
              "trained_at": time.time()}
    return model, record


def _complete(record: dict[str, Any], spec: VictimSpec) -> dict[str, Any]:
    """A record stored before lineages existed, with the lineage fields filled in."""
    return {"kind": "model", "parent_key": spec.parent_key(), "describe": spec.describe(),
            "lineage": spec.lineage(), "step_kind": spec.steps[-1].kind if spec.steps else "",
            "parent_sha256": None, "run_id": None, **record}


def _model_run(spec: VictimSpec, ctx: TrialContext, store: Store, record: dict[str, Any],
               parent_record: dict[str, Any] | None) -> str | None:
    parent_key = record["parent_key"]
    parent_run = (parent_record or (store.record(parent_key) if parent_key else None) or {})
    step = spec.steps[-1] if spec.steps else None
    params: dict[str, Any] = {"lineage_key": record["key"], "parent_key": parent_key,
                              "lineage": record["describe"], "model": spec.model,
                              "dataset": spec.dataset, "seed": spec.seed}
    if step is not None:
        params["step"] = step.dump()
    else:
        params["base"] = spec.identity()
    metrics = {"acc": record["acc"], "seconds": record["seconds"], **record["metrics"]}
    return ctx.model_run(record["key"], name=record["describe"][:250], parent_key=parent_key,
                         step_kind=step.kind if step else "base", params=params,
                         metrics=metrics, parent_run_id=parent_run.get("run_id"))


Found = tuple[nn.Module | None, dict[str, Any], str | None]


def _ensure(store: Store, spec: VictimSpec, ctx: TrialContext,
            data: Callable[[], ImageData], *, need_model: bool) -> Found:
    """(model or None, record, committed SHA-256) of ``spec``, made if absent; locks are
    taken child first, then parent, never the reverse."""
    key = spec.key()
    sk = spec.steps[-1].step_kind if spec.steps else None
    with store.lock(key, on_wait=ctx.progress):
        found = store.load(key, report=ctx.warn)
        if found is not None and "state_dict" not in found:
            ctx.warn(f"store: entry {key} holds an object, not a model; making the model again")
            store.delete(key)
            found = None
        legacy = spec.legacy_key()
        if found is None and legacy is not None:
            found = _migrate(store, legacy, key, spec, ctx)
        parent: Found | None = None
        if sk is not None and sk.uses_parent:
            parent = _ensure(store, spec.parent(), ctx, data, need_model=found is None)
            if found is not None and found["record"].get("parent_sha256") != parent[2]:
                ctx.warn(f"model {key} ({spec.describe()}) was made from other weights of its "
                         f"parent {spec.parent_key()} than the stored ones (parent_sha256 "
                         "differs); making it again")
                store.delete(key)
                found = None
                parent = _ensure(store, spec.parent(), ctx, data, need_model=True)
        if found is not None:
            model = None
            if need_model:
                model = build_model(spec)
                model.load_state_dict(found["state_dict"])
            return model, {**_complete(found["record"], spec), "source": "store"}, store.sha256(key)
        model, record = _make(spec, ctx, data(), key, parent)
        record["run_id"] = _model_run(spec, ctx, store, record,
                                      parent[1] if parent is not None else None)
        store.save(key, model.state_dict(), record)
        # the store holds the weights now; drop the trial's copy from its checkpoints
        ctx.save_state(model_state_key(spec), None)
        ctx.progress(f"model {key}: stored, acc {record['acc']:.4f}")
        return model, {**record, "source": "trained"}, store.sha256(key)


def _migrate(store: Store, legacy: str, key: str, spec: VictimSpec, ctx: TrialContext,
             ) -> dict[str, Any] | None:
    """Move a poisoned victim stored under its pre-lineage key to its ``label_flip`` child
    key (the weights are the same: same network, seed, flipped labels and recipe). Called
    holding the new key's lock; takes the old key's."""
    with store.lock(legacy, on_wait=ctx.progress):
        found = store.load(legacy, report=ctx.warn)
        if found is None or "state_dict" not in found:
            return None
        record = {**_complete(found["record"], spec), "key": key, "legacy_key": legacy}
        record.setdefault("metrics", {"acc": record["acc"]})
        store.save(key, found["state_dict"], record)
        store.delete(legacy)
    ctx.progress(f"model {key}: moved from its pre-lineage key {legacy} ({spec.describe()})")
    return {"state_dict": found["state_dict"], "record": record}


def _make_unstored(spec: VictimSpec, ctx: TrialContext, data: ImageData,
                   ) -> tuple[nn.Module, dict[str, Any]]:
    parent: Found | None = None
    sk = spec.steps[-1].step_kind if spec.steps else None
    if sk is not None and sk.uses_parent:
        pm, prec = _make_unstored(spec.parent(), ctx, data)
        parent = (pm, prec, None)
    model, record = _make(spec, ctx, data, spec.key(), parent)
    return model, {**record, "run_id": None, "source": "trained"}


def ensure_victim(spec: VictimSpec, ctx: TrialContext, *, data: ImageData | None = None,
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """The model of ``spec`` (eval mode, on ``ctx.device``) and its record ``{"kind":
    "model", "key", "parent_key", "describe", "lineage", "step_kind", "parent_sha256",
    "metrics" (the step's), "acc", "seconds", "train_loss", "epochs", "n_train", "n_test",
    "param_count", "spec", "run_id" (its model run), "trained_at", "source"}``; ``source`` is
    ``"store"`` when loaded and ``"trained"`` when this call made it.

    Walks the lineage. Under the store's lock for the key: load it from ``ctx.store_root``
    (a corrupt entry is reported in one line through ``ctx.warn``, deleted and made again);
    a child of a step that uses its parent is only loaded when its record's
    ``parent_sha256`` is the parent's committed SHA-256 (the parent is ensured first, under
    its own lock: child -> parent, never the reverse), else it is made again on the
    parent's current weights. To make it: the base trains with the one training loop (epoch
    checkpoints in ``ctx`` under ``"victim/<key>"``, so a retried trial resumes), a step
    applies its kind to the ensured parent (``"model/<key>"``); then its model run is
    recorded (``ctx.model_run``) and it is saved atomically. A poisoned victim stored under
    its pre-lineage key (``legacy_key``) is moved to its new key on first use. Concurrent
    callers for one key wait for the lock and load, so a model is made once. ``data`` (the
    full dataset, to avoid reloading) is cut to the spec's sizes. With ``ctx.store_root``
    None nothing is stored and only ``ctx``'s state is reused.
    """
    spec = spec.spec()
    key = spec.key()
    if ctx.store_root is None:
        model, record = _make_unstored(spec, ctx, victim_data(spec, ctx, data))
        return model.to(ctx.device).eval(), record

    store = Store(ctx.store_root)
    cut = functools.cache(lambda: victim_data(spec, ctx, data))
    model, record, _ = _ensure(store, spec, ctx, cut, need_model=True)
    assert model is not None
    model.to(ctx.device).eval()
    ctx.model_used(key, record.get("run_id"))
    if record["source"] == "trained":
        return model, record
    if data is not None or spec.max_test_examples != record["spec"].get("max_test_examples"):
        test = cut()
        if len(test.y_test) != record["n_test"]:  # another test subset: measure on this one
            record["acc"] = evaluate(model, test.x_test, test.y_test, device=ctx.device)
            record["n_test"] = len(test.y_test)
    ctx.progress(f"model {key}: loaded from the store, acc {record['acc']:.4f}")
    return model, record


#: the lineage-general name of :func:`ensure_victim`
ensure_model = ensure_victim
