"""The EVAS search trial (PROTOCOLS 5 "Search (regularised evolution)"): one whole search on
kappa (regularised evolution, or the random-search baseline) as one trial. Scoring needs no
training, so the search is cheap per step and checkpointed after every score evaluation
through the trial context: a killed search resumes to the identical trajectory.

Each arch is scored as the ``evas`` trial scores it (same batch, :func:`.evas.kappa_batch`
under ``seed``, same builders, :func:`~..metrics.ntk.kappa_scores` with ``kappa.n_init``
inits and ``kappa.bn_mode``, ``eval`` by default), on the one kappa ``variant`` that drives
the search (``generator``, Eq. 6, by default); so the ``evas`` trial of a found arch with the
same sizes and seed reports the search's score as its ``kappa_<variant>``. Scores go through a
:class:`~..searches.cache.ScoreCache` keyed by isomorphism class and scoring config, held in
the checkpoint.

Logged: per iteration the metrics ``score`` and ``best_so_far`` (step = iteration; step 0 is
the initial pool's best); artifacts ``trajectory.json`` (rows ``{iteration, arch, score,
best_so_far}``, row 0 the initial pool's best: what a derived ``every_kth`` stage reads),
``found.json`` (one row: the best arch seen), ``pool.json`` (the final pool).

Deviations: ``search_seed`` seeds the search (pool, samples, mutations) and ``seed`` the
scoring (batch, inits) as in the ``evas`` trial, so every search of a study scores the same
objective and ``--seed`` changes the objective, not the search; the reference measured
ACC/ASR inside the search loop, here derived stages of the study train the trajectory's archs.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from ..context import TrialContext
from ..data import dataset_info, load_dataset
from ..metrics.ntk import kappa_scores
from ..models.generator import TriggerGenerator
from ..models.nats.network import TinyNetwork
from ..models.wrapper import Normalized
from ..registry import TRIAL_KINDS, DatasetName
from ..searches import evolution as evo
from ..searches.cache import ScoreCache
from .base import TrialKind
from .evas import KappaConfig, kappa_batch

STRICT = ConfigDict(extra="forbid", frozen=True)
STATE_KEY = "search"


class EvasSearchConfig(BaseModel):
    """One search. ``kappa`` is the ``evas`` trial's :class:`~.evas.KappaConfig`; a search
    scores one variant (``variant``), so ``kappa.variants`` is ``[variant]`` and
    ``kappa.te_nas`` false (filled in when not given). ``max_train_examples``: the training
    examples the scoring batch is drawn from (set it as the ``evas`` stage's, for the same
    batch)."""

    model_config = STRICT
    method: Literal["evolution", "random"] = "evolution"
    pool_size: int = Field(50, ge=1, le=15_625)
    sample_size: int = Field(10, ge=1)
    iterations: int = Field(4000, ge=0, le=1_000_000)
    search_seed: int = 0
    seed: int = 0
    dataset: DatasetName = "cifar10"
    C: int = Field(16, ge=1)
    N: int = Field(5, ge=1)
    variant: Literal["generator", "arch", "bare"] = "generator"
    kappa: KappaConfig = KappaConfig(variants=("generator",), te_nas=False)
    generator_channels: tuple[PositiveInt, PositiveInt, PositiveInt] = (32, 64, 128)
    max_train_examples: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _one_variant(cls, data: object) -> object:
        if isinstance(data, dict):
            variant = data.get("variant", "generator")
            kappa = data.get("kappa", {})
            if isinstance(kappa, dict):
                kappa = {"variants": [variant], "te_nas": False, **kappa}
                data = {**data, "kappa": kappa}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> EvasSearchConfig:
        if tuple(self.kappa.variants) != (self.variant,) or self.kappa.te_nas:
            raise ValueError(f"a search scores one kappa variant: kappa.variants must be "
                             f"[{self.variant}] (the variant field) and kappa.te_nas false")
        if self.sample_size > self.pool_size:
            raise ValueError(f"sample_size {self.sample_size} is larger than pool_size "
                             f"{self.pool_size}")
        return self

    def scoring(self) -> dict[str, object]:
        """What a score depends on (the cache's config half)."""
        return {"dataset": self.dataset, "C": self.C, "N": self.N, "variant": self.variant,
                "batch_size": self.kappa.batch_size, "n_init": self.kappa.n_init,
                "bn_mode": self.kappa.bn_mode, "seed": self.seed,
                "generator_channels": list(self.generator_channels),
                "max_train_examples": self.max_train_examples}


def kappa_scorer(cfg: EvasSearchConfig, ctx: TrialContext):
    """``arch -> kappa_<variant>`` on the ``evas`` trial's scoring batch (no cache)."""
    data = load_dataset(cfg.dataset, root=ctx.data_root, download=ctx.download)
    data = data.subset(cfg.max_train_examples, None)
    x = kappa_batch(data, cfg.kappa.batch_size, cfg.seed, ctx.device)
    info = dataset_info(cfg.dataset)
    channels = cfg.generator_channels
    needs_generator = cfg.variant != "bare"

    def score(arch: str) -> float:
        def build() -> torch.nn.Module:
            net = TinyNetwork(arch, C=cfg.C, N=cfg.N, num_classes=info.num_classes)
            return Normalized(net, info.mean, info.std)

        out = kappa_scores(
            build, x,
            build_generator=(lambda: TriggerGenerator(channels=channels)) if needs_generator
            else None,
            variants=(cfg.variant,), n_init=cfg.kappa.n_init, seed=cfg.seed,
            bn_mode=cfg.kappa.bn_mode)
        return out[f"kappa_{cfg.variant}"]

    return score


def run_search_trial(cfg: EvasSearchConfig, ctx: TrialContext, score) -> dict[str, float]:
    """The search of ``cfg`` with the score function ``score`` (cached here), checkpointed
    after every evaluation; returns the trial's metrics and writes its artifacts."""
    saved = ctx.load_state(STATE_KEY)
    if saved is not None:
        state = evo.SearchState.from_dict(saved["search"])
        cache = ScoreCache(saved["cache"])
        spent = float(saved.get("seconds", 0.0))
        ctx.progress(f"search resumed at iteration {state.iteration} "
                     f"({state.evaluations} evaluations)")
    else:
        state = evo.init_search(cfg.method, pool_size=cfg.pool_size,
                                sample_size=cfg.sample_size, iterations=cfg.iterations,
                                seed=cfg.search_seed)
        cache = ScoreCache()
        spent = 0.0
    scored = cache.cached(score, cfg.scoring())
    t0 = time.perf_counter()
    # iterations/s of this attempt: each iteration step timed with its checkpoint and logging
    clock = {"last": t0, "iter_s": 0.0, "n_iter": 0}

    def on_step(s: evo.SearchState) -> None:
        # metrics before the checkpoint: a search killed in between logs this step again when
        # it resumes (the same values; the report keeps one per step), never leaves a gap
        last_it = s.hist_iteration[-1]
        if last_it > 0:
            ctx.log_metrics({"score": evo.rank_value(s.hist_score[-1]),
                             "best_so_far": s.best}, step=last_it)
        elif s.evaluations == s.pool_size:  # the initial pool is scored: its best is step 0
            ctx.log_metrics({"score": s.best, "best_so_far": s.best}, step=0)
        # "epoch": the runner names a checkpoint by it (study/trainable.py state_epoch)
        ctx.save_state(STATE_KEY, {"search": s.to_dict(), "cache": cache.state(),
                                   "seconds": spent + time.perf_counter() - t0,
                                   "epoch": s.iteration},
                       metrics={"iteration": s.iteration, "evaluations": s.evaluations})
        now = time.perf_counter()
        if last_it > 0:
            clock["iter_s"] += now - clock["last"]
            clock["n_iter"] += 1
            if s.iteration % 100 == 0:
                ctx.progress(f"iteration {s.iteration}/{s.iterations}: best {s.best:.4g}, "
                             f"cache hit rate {cache.hit_rate:.2f}")
        clock["last"] = now

    evo.run_search(state, scored, on_step=on_step)
    total = spent + time.perf_counter() - t0

    art = ctx.artifact_dir
    (art / "trajectory.json").write_text(json.dumps(evo.trajectory(state)) + "\n")
    best = evo.found(state)
    (art / "found.json").write_text(json.dumps([best]) + "\n")
    pool = [{"arch": evo.arch_of(a), "score": evo.finite_or_none(evo.rank_value(s)), "age": age}
            for a, s, age in zip(state.pool, state.pool_scores, state.ages(), strict=True)]
    (art / "pool.json").write_text(json.dumps(pool) + "\n")
    return {
        "best_score": float(state.best),
        "pool_median_score": evo.median_score(state.pool_scores),
        "initial_pool_median": evo.initial_pool_median(state),
        "found_iteration": float(best.get("iteration", 0)),
        "hit_rate": cache.hit_rate,
        "cache_hits": float(cache.hits),
        "kappa_evaluations": float(cache.misses),
        "evaluations": float(state.evaluations),
        "iterations_per_s": clock["n_iter"] / clock["iter_s"] if clock["iter_s"] > 0 else 0.0,
        "time_search_s": total,
    }


def run_evas_search(config: dict, ctx: TrialContext) -> dict[str, float]:
    cfg = EvasSearchConfig.model_validate(config)
    return run_search_trial(cfg, ctx, kappa_scorer(cfg, ctx))


METRICS = ("best_score", "pool_median_score", "initial_pool_median", "found_iteration",
           "hit_rate", "cache_hits", "kappa_evaluations", "evaluations", "iterations_per_s",
           "time_search_s")


def trial_name(cfg: EvasSearchConfig) -> str:
    return (f"{cfg.method} seed={cfg.search_seed} pool={cfg.pool_size} it={cfg.iterations} "
            f"{cfg.dataset}")


TRIAL_KINDS.register("evas_search", TrialKind(
    fn=run_evas_search, config_model=EvasSearchConfig, metrics=METRICS, name=trial_name,
    name_prefix="s",  # "s0003": the 4th search of its stage's plan
    description="one kappa search (regularised evolution or random), checkpointed every "
                "iteration: trajectory.json, found.json"))
