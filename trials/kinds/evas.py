"""The EVAS trial (PROTOCOLS 5, correlation study): one NATS-Bench arch ->
kappa scores (generator / arch / bare variants, TE-NAS extra) -> train the arch on clean data
-> train the input-aware trigger generator against the frozen arch -> ACC, ASR.

Deviations: ACC/ASR come from our own training of each arch (``train``; the NATS-Bench recipe
at the `paper` profile), not from NATS-Bench's official trained weights, which need the
benchmark files (PROTOCOLS 3 allows both; the official-weights path is not built yet).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..backdoor.input_aware import GeneratorConfig, save_trigger_examples, train_generator
from ..context import TrialContext
from ..data import dataset_info, load_dataset, to_float
from ..data.augment import augment
from ..metrics.ntk import kappa_scores, te_nas_score
from ..models.generator import TriggerGenerator
from ..models.nats.arch_string import op_counts, parse_arch
from ..models.nats.network import TinyNetwork
from ..models.wrapper import Normalized
from ..registry import TRIAL_KINDS, DatasetName
from ..train import NATS_RECIPE, TrainConfig, train
from .base import TrialKind

STRICT = ConfigDict(extra="forbid", frozen=True)


class KappaConfig(BaseModel):
    """How kappa is scored (PROTOCOLS 5 "Score kappa", "BatchNorm while scoring"). ``bn_mode``
    defaults to ``eval`` (BatchNorm on the fresh running statistics, the reference's scoring of
    EVAS's figure); ``coupled`` is the reference's search script, ``fixed-stats`` ours."""

    model_config = STRICT
    batch_size: int = Field(96, ge=2)
    n_init: int = Field(3, ge=1)
    variants: tuple[Literal["generator", "arch", "bare"], ...] = ("generator", "arch", "bare")
    bn_mode: Literal["eval", "fixed-stats", "coupled"] = "eval"
    te_nas: bool = True


class EvasConfig(BaseModel):
    """One EVAS trial. ``max_train_examples`` / ``max_test_examples`` shrink the data at the
    `smoke` profile (sizes only; what is computed is the same)."""

    model_config = STRICT
    arch: str
    dataset: DatasetName = "cifar10"
    C: int = Field(16, ge=1)
    N: int = Field(5, ge=1)
    params: Literal["paper", "artifact"] = "paper"
    seed: int = 0
    train: TrainConfig = NATS_RECIPE
    generator: GeneratorConfig = GeneratorConfig()
    kappa: KappaConfig = KappaConfig()
    max_train_examples: int | None = Field(None, ge=1)
    max_test_examples: int | None = Field(None, ge=1)
    generator_train_examples: int | None = Field(None, ge=1)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        parse_arch(v)  # raises ArchStringError naming the problem
        return v

    @model_validator(mode="before")
    @classmethod
    def _generator_params(cls, data: object) -> object:
        # the generator's epochs follow the trial's parameter set (PROTOCOLS 5)
        if isinstance(data, dict) and "params" in data:
            gen = data.get("generator", {})
            if isinstance(gen, dict) and "params" not in gen:
                data = {**data, "generator": {**gen, "params": data["params"]}}
        return data

    @model_validator(mode="after")
    def _target_is_a_class(self) -> EvasConfig:
        # checked at plan time, not inside every trial on the cluster
        n = dataset_info(self.dataset).num_classes
        if self.generator.target >= n:
            raise ValueError(f"generator.target {self.generator.target} is not a class of "
                             f"{self.dataset} (classes 0..{n - 1})")
        return self


def _classifier_builder(cfg: EvasConfig):
    info = dataset_info(cfg.dataset)

    def build() -> torch.nn.Module:
        net = TinyNetwork(cfg.arch, C=cfg.C, N=cfg.N, num_classes=info.num_classes)
        return Normalized(net, info.mean, info.std)

    return build


def kappa_batch(data, batch_size: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """The kappa scoring batch (PROTOCOLS 5 "Score kappa"): ``batch_size`` training inputs
    drawn by a permutation seeded with ``seed``, augmented (crop + flip) by the same generator.
    One home, so every trial kind that scores kappa (``evas``, ``kappa_atlas``) scores an arch
    on the same batch."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.y_train), generator=gen)[:batch_size]
    return augment(to_float(data.x_train[idx]), "crop_flip", generator=gen).to(device)


def run_evas(config: dict, ctx: TrialContext) -> dict[str, float]:
    cfg = EvasConfig.model_validate(config)
    data = load_dataset(cfg.dataset, root=ctx.data_root, download=ctx.download)
    data = data.subset(cfg.max_train_examples, cfg.max_test_examples)
    build = _classifier_builder(cfg)
    out: dict[str, float] = {}

    # 1. kappa on one augmented training batch (seeded), median over re-initialisations
    scores = ctx.load_state("kappa")
    if scores is None:
        t0 = time.perf_counter()
        x = kappa_batch(data, cfg.kappa.batch_size, cfg.seed, ctx.device)
        channels = cfg.generator.channels
        scores = dict(kappa_scores(build, x,
                                   build_generator=lambda: TriggerGenerator(channels=channels),
                                   variants=cfg.kappa.variants, n_init=cfg.kappa.n_init,
                                   seed=cfg.seed, bn_mode=cfg.kappa.bn_mode))
        if cfg.kappa.te_nas:
            torch.manual_seed(cfg.seed)
            scores["te_nas"] = float(te_nas_score(build().to(ctx.device), x))
        scores["time_kappa_s"] = time.perf_counter() - t0
        ctx.save_state("kappa", scores, metrics={k: v for k, v in scores.items()
                                                  if v == v and abs(v) != float("inf")})
    out.update(scores)
    ctx.progress(f"kappa done: { {k: round(v, 3) for k, v in scores.items()} }")

    # 2. train the arch on clean data (epoch checkpoints through ctx)
    torch.manual_seed(cfg.seed)
    model = build().to(ctx.device)
    # per-epoch curves `train_loss` / `test_acc` (no prefix: "train_" doubled them)
    res = train(model, data, cfg.train, seed=cfg.seed, ctx=ctx, state_key="train")
    out["clean_acc"] = res["test_acc"]
    out["time_train_s"] = res["seconds"]

    # 3. the input-aware trigger generator against the frozen arch
    gdata = data.subset(cfg.generator_train_examples, None)
    g = train_generator(model, gdata, cfg.generator, seed=cfg.seed, ctx=ctx,
                        state_key="generator")
    out["acc"] = g["acc"]
    out["asr"] = g["asr"]
    out["time_generator_s"] = g["seconds"]
    if "generator" in g:
        save_trigger_examples(g["generator"], data.x_test[:8], ctx.artifact_dir / "triggers.png")
    return out


def extra_params(cfg: EvasConfig) -> dict[str, object]:
    """Logged beside the config: op counts of the arch (PROTOCOLS 1.1)."""
    return {f"ops.{k}": v for k, v in op_counts(cfg.arch).items()}


def trial_name(cfg: EvasConfig) -> str:
    """The run's name after its index (``a0042 |nor_conv_3x3~0|+... cifar10``, the index
    added by the plan from :attr:`name_prefix`)."""
    return f"{cfg.arch} {cfg.dataset}"


def metric_names(cfg: EvasConfig) -> tuple[str, ...]:
    kappa = tuple(m for v in cfg.kappa.variants for m in (f"kappa_{v}", f"kappa_{v}_flagged"))
    return (*kappa, *(("te_nas",) if cfg.kappa.te_nas else ()), "time_kappa_s", "clean_acc",
            "time_train_s", "acc", "asr", "time_generator_s")


TRIAL_KINDS.register("evas", TrialKind(
    fn=run_evas, config_model=EvasConfig,
    metrics=metric_names(EvasConfig(arch="|none~0|+|none~0|none~1|+|none~0|none~1|none~2|")),
    metrics_for=metric_names, name=trial_name,
    name_prefix="a",  # "a0042": the 43rd arch of its stage's plan
    params=extra_params,
    description="kappa of one NATS arch, then clean training and the trigger generator: ACC, ASR"))
