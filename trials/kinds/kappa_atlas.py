"""The kappa atlas trial (issue 9 "Atlas"; PROTOCOLS 5 "Score kappa", "BatchNorm while
scoring"): kappa of many NATS archs in one trial, in every BatchNorm mode (``eval``,
``fixed-stats``, ``coupled``) and every parameter-set variant (``generator`` = Eq. 6,
``arch``, ``bare``), median over ``n_init`` initialisations. A study of ``n_chunks`` such
trials scores the whole space (15,625 strings, or the 6,466 isomorphism classes with
``unique``), so the runner's per-trial cost is spread over many archs.

The atlas list is :func:`atlas_archs`: a seeded permutation of the space (``order_seed``),
cut to its first ``limit`` archs; chunk ``i`` of ``n_chunks`` scores the archs at positions
``i, i + n_chunks, i + 2 n_chunks, ...`` (:func:`chunk_archs`). Strided, not contiguous:
chunk sizes differ by at most one whatever the length, and each chunk (and the archs a
partly finished study has scored) is itself a uniform sample of the list; contiguous slices
of the unshuffled product order would put all archs with e.g. ``none`` on the first edge in
one chunk, which would be cheaper than the others. With ``order_seed = 0`` the list is
the order :func:`~..models.nats.arch_string.sample_archs` walks, so the first 900 archs of
the ``unique`` list are the ``evas-kappa`` paper sample (``sample_archs(900, seed=0)``).

Each arch is scored as the ``evas`` trial scores it (the batch of :func:`.evas.kappa_batch`
under ``seed``, the same classifier and generator builders, :func:`kappa_scores` with seeds
``seed .. seed + n_init - 1``), so an ``evas`` trial with the same sizes reports the atlas's
kappa of its arch.

Resumable: after an arch the scores so far are saved through ``ctx.save_state`` whenever the
compute since the last save is at least :data:`SAVE_EVERY_COST` times what the last save took
(the first arch always), so checkpoints cost at most ~1/SAVE_EVERY_COST (2%) of compute
whatever a save costs on the machine; a killed trial resumes at the first arch not in its
last checkpoint. The chunk's table is the artifact ``atlas_chunk_<chunk>.csv`` (columns
``index`` (position in the atlas list), ``arch``, ``iso_key``, then per mode and variant
``<mode>.kappa_<variant>`` (median over inits, +inf when flagged) and
``<mode>.kappa_<variant>_flagged`` (fraction of inits flagged)).

Deviations: the atlas scores no TE-NAS (not part of the atlas); ``order_seed`` is separate from
``seed`` so ``--seed`` changes the scoring inits, not which archs a ``limit`` keeps.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from ..context import TrialContext
from ..data import dataset_info, load_dataset
from ..metrics.ntk import VARIANTS, kappa_scores
from ..models.generator import TriggerGenerator
from ..models.nats.arch_string import isomorphism_key, sample_archs, unique_archs
from ..models.nats.network import TinyNetwork
from ..models.wrapper import Normalized
from ..registry import TRIAL_KINDS, DatasetName
from .base import TrialKind
from .evas import kappa_batch

BN_MODES: tuple[str, ...] = ("eval", "fixed-stats", "coupled")
N_ALL, N_UNIQUE = 15_625, 6_466
#: save when compute since the last save >= this many times the last save's duration
SAVE_EVERY_COST = 50.0
STATE_KEY = "atlas"

Mode = Literal["eval", "fixed-stats", "coupled"]
Variant = Literal["generator", "arch", "bare"]


class AtlasConfig(BaseModel):
    """One chunk of the atlas. Sizes (``C``, ``N``, ``batch_size``, ``generator_channels``,
    ``max_train_examples``) mean what they mean in the ``evas`` trial."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    chunk: int = Field(0, ge=0)
    n_chunks: int = Field(1, ge=1)
    unique: bool = False
    limit: int | None = Field(None, ge=1)
    order_seed: int = 0
    bn_modes: tuple[Mode, ...] = BN_MODES  # type: ignore[assignment]
    variants: tuple[Variant, ...] = VARIANTS  # type: ignore[assignment]
    n_init: int = Field(3, ge=1)
    batch_size: int = Field(96, ge=2)
    dataset: DatasetName = "cifar10"
    C: int = Field(16, ge=1)
    N: int = Field(5, ge=1)
    generator_channels: tuple[PositiveInt, PositiveInt, PositiveInt] = (32, 64, 128)
    seed: int = 0
    max_train_examples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> AtlasConfig:
        space = N_UNIQUE if self.unique else N_ALL
        if self.limit is not None and self.limit > space:
            raise ValueError(f"limit {self.limit} is more than the {space:,} archs of the "
                             f"{'unique' if self.unique else 'full'} space")
        n = atlas_size(self)
        if self.chunk >= self.n_chunks:
            raise ValueError(f"chunk {self.chunk} is not one of 0..{self.n_chunks - 1}")
        if self.n_chunks > n:
            raise ValueError(f"n_chunks {self.n_chunks} is more than the {n} archs to score "
                             "(a chunk would be empty)")
        for name, values in (("bn_modes", self.bn_modes), ("variants", self.variants)):
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be non-empty and distinct, got {list(values)}")
        return self


def atlas_size(cfg: AtlasConfig) -> int:
    space = N_UNIQUE if cfg.unique else N_ALL
    return space if cfg.limit is None else min(cfg.limit, space)


def atlas_archs(*, unique: bool, order_seed: int = 0, limit: int | None = None) -> list[str]:
    """The atlas list: every arch string (or one arch per isomorphism class, the first met
    in the walk) in the seeded order of :func:`sample_archs`, the first ``limit`` kept."""
    n = len(unique_archs()) if unique else N_ALL
    n = n if limit is None else min(limit, n)
    return sample_archs(n, seed=order_seed, distinct="isomorphism" if unique else "string")


def chunk_archs(archs: Sequence[str], chunk: int, n_chunks: int) -> list[tuple[int, str]]:
    """``(position, arch)`` of chunk ``chunk``: positions ``chunk, chunk + n_chunks, ...``."""
    return [(i, archs[i]) for i in range(chunk, len(archs), n_chunks)]


def score_columns(cfg: AtlasConfig) -> list[str]:
    """The score columns of the chunk table (and of the saved state), in order."""
    return [f"{m}.kappa_{v}{suffix}" for m in cfg.bn_modes for v in cfg.variants
            for suffix in ("", "_flagged")]


def score_arch(arch: str, x: torch.Tensor, cfg: AtlasConfig) -> list[float]:
    """One arch's :func:`score_columns` values: :func:`kappa_scores` per BN mode."""
    info = dataset_info(cfg.dataset)

    def build() -> torch.nn.Module:
        return Normalized(TinyNetwork(arch, C=cfg.C, N=cfg.N, num_classes=info.num_classes),
                          info.mean, info.std)

    def build_generator() -> torch.nn.Module:
        return TriggerGenerator(channels=cfg.generator_channels)

    needs_gen = any(v != "bare" for v in cfg.variants)
    row: list[float] = []
    for mode in cfg.bn_modes:
        s = kappa_scores(build, x, build_generator=build_generator if needs_gen else None,
                         variants=cfg.variants, n_init=cfg.n_init, seed=cfg.seed,
                         bn_mode=mode)
        for v in cfg.variants:
            row += [s[f"kappa_{v}"], s[f"kappa_{v}_flagged"]]
    return row


def run_kappa_atlas(config: dict, ctx: TrialContext) -> dict[str, float]:
    """Score the chunk's archs from the first one not in the checkpoint (module docstring)."""
    t_start = time.perf_counter()
    cfg = AtlasConfig.model_validate(config)
    todo = chunk_archs(atlas_archs(unique=cfg.unique, order_seed=cfg.order_seed,
                                   limit=cfg.limit), cfg.chunk, cfg.n_chunks)
    cols = score_columns(cfg)
    state = ctx.load_state(STATE_KEY) or {"scores": torch.zeros(0, len(cols),
                                                                dtype=torch.float64),
                                          "compute_s": 0.0, "save_s": 0.0, "saves": 0}
    rows = [list(map(float, r)) for r in state["scores"].tolist()]
    compute_s, save_s, saves = float(state["compute_s"]), float(state["save_s"]), state["saves"]
    resumed_at = len(rows)
    data = load_dataset(cfg.dataset, root=ctx.data_root, download=ctx.download)
    data = data.subset(cfg.max_train_examples, None)
    x = kappa_batch(data, cfg.batch_size, cfg.seed, ctx.device)
    since_save, last_save = 0.0, 0.0
    for n, (pos, arch) in enumerate(todo[resumed_at:], start=resumed_at):
        t0 = time.perf_counter()
        rows.append(score_arch(arch, x, cfg))
        dt = time.perf_counter() - t0
        compute_s += dt
        since_save += dt
        ctx.progress(f"atlas chunk {cfg.chunk}: arch {n + 1}/{len(todo)} (#{pos}) {dt:.2f} s")
        if n == resumed_at or n == len(todo) - 1 or since_save >= SAVE_EVERY_COST * last_save:
            t1 = time.perf_counter()
            ctx.save_state(STATE_KEY, {
                "scores": torch.tensor(rows, dtype=torch.float64), "compute_s": compute_s,
                "save_s": save_s, "saves": saves + 1})
            last_save = time.perf_counter() - t1
            save_s, saves, since_save = save_s + last_save, saves + 1, 0.0
    _write_chunk(ctx, cfg, todo, cols, rows)
    return _summary(cfg, cols, np.asarray(rows, dtype=np.float64).reshape(len(todo), len(cols)),
                    compute_s=compute_s, save_s=save_s, saves=saves, resumed_at=resumed_at,
                    wall_s=time.perf_counter() - t_start)


def _write_chunk(ctx: TrialContext, cfg: AtlasConfig, todo: list[tuple[int, str]],
                 cols: list[str], rows: list[list[float]]) -> None:
    path = ctx.artifact_dir / f"atlas_chunk_{cfg.chunk}.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "arch", "iso_key", *cols])
        for (pos, arch), row in zip(todo, rows, strict=True):
            w.writerow([pos, arch, isomorphism_key(arch), *(repr(float(v)) for v in row)])


def _summary(cfg: AtlasConfig, cols: list[str], table: np.ndarray, *, compute_s: float,
             save_s: float, saves: int, resumed_at: int, wall_s: float) -> dict[str, float]:
    out = {"n_archs": float(len(table)), "compute_s": compute_s,
           "seconds_per_arch": compute_s / max(len(table), 1), "checkpoint_s": save_s,
           "checkpoint_saves": float(saves), "checkpoint_share": save_s / max(compute_s, 1e-9),
           "resumed_at": float(resumed_at),
           # this attempt's wall time in the trial function (data, batch, scoring, saves)
           "trial_fn_s": wall_s}
    for mode in cfg.bn_modes:
        flags = []
        for v in cfg.variants:
            kappa = table[:, cols.index(f"{mode}.kappa_{v}")]
            out[f"median.{mode}.kappa_{v}"] = float(np.median(kappa))  # +inf ranks largest
            flags.append(table[:, cols.index(f"{mode}.kappa_{v}_flagged")])
        out[f"flagged.{mode}"] = float(np.mean(flags))
    return out


def metric_names(cfg: AtlasConfig) -> tuple[str, ...]:
    return ("n_archs", "compute_s", "seconds_per_arch", "checkpoint_s", "checkpoint_saves",
            "checkpoint_share", "resumed_at", "trial_fn_s",
            *(f"median.{m}.kappa_{v}" for m in cfg.bn_modes for v in cfg.variants),
            *(f"flagged.{m}" for m in cfg.bn_modes))


def trial_name(cfg: AtlasConfig) -> str:
    """``c0003 chunk 3/125 all cifar10`` (the index added by the plan)."""
    return (f"chunk {cfg.chunk}/{cfg.n_chunks} {'unique' if cfg.unique else 'all'}"
            f"{'' if cfg.limit is None else f' first {cfg.limit}'} {cfg.dataset}")


def extra_params(cfg: AtlasConfig) -> dict[str, object]:
    """Logged beside the config: how many archs the chunk and the whole atlas hold."""
    n = atlas_size(cfg)
    return {"atlas_size": n, "chunk_size": len(range(cfg.chunk, n, cfg.n_chunks))}


TRIAL_KINDS.register("kappa_atlas", TrialKind(
    fn=run_kappa_atlas, config_model=AtlasConfig, metrics=metric_names(AtlasConfig(limit=1)),
    metrics_for=metric_names, name=trial_name, name_prefix="c", params=extra_params,
    description="kappa of a chunk of the NATS space in every BN mode and variant (the atlas)"))
