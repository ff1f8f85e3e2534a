"""The ``attack`` trial of the AutoML-risks study (PROTOCOLS 4; Pang et al., "On the Security
Risks of AutoML", USENIX Security 2022, Sec. 4, Table 3, Figs. 4-5): one evasion attack on one
victim from the store.

The victim comes from :func:`~nasrisk.trials.victims.ensure_victim`: it is loaded from the
store, or trained there (once, under the store's lock) when no victim trial has made it yet.
The attacks are those of :mod:`nasrisk.trials.attacks`; this module only wires them to the
victim, the inputs and the runner.

``attack`` value -> metrics (besides ``victim_acc``, ``n_attacked`` and ``victim_trained`` =
1 when this trial had to train the victim, always):

* ``pgd_targeted``: ``asr_m``, ``asr_l`` - targeted PGD, most-/least-likely target
  (:func:`~nasrisk.trials.attacks.pgd.pgd_targeted_case`, settings of ``params``), and
  ``pgd_queries_m``, ``pgd_queries_l``: mean model evaluations per attacked input (1 clean
  query + one forward pass per iterate judged, at most ``1 + restarts * (iters + 1)``).
* ``pgd_sweep``: ``asr_eps_1`` ... ``asr_eps_16`` - untargeted PGD per eps in /255
  (:func:`~nasrisk.trials.attacks.pgd.pgd_eps_sweep`).
* ``nes``: ``nes_asr_m``, ``nes_asr_l``, ``nes_queries_m``, ``nes_queries_l`` (mean model
  queries spent per attacked input, successful or not: 1 clean query + (estimate + 1
  success check) per iteration run, at most ``1 + iters * (queries_per_estimate + 1)``) and
  ``nes_queries_success_m/_l`` (mean over the successful inputs)
  (:func:`~nasrisk.trials.attacks.nes.nes`, settings of ``params``:
  :func:`~nasrisk.trials.attacks.nes.nes_params`).
* ``pgd_overlap``: ``overlap_fooled``, ``overlap_clean_acc``, ``overlap_asr`` and the artifact
  ``overlap.npz`` (:func:`~nasrisk.trials.attacks.pgd.pgd_overlap_attack`).

Inputs. ``pgd_targeted``, ``pgd_sweep`` and ``nes`` attack ``n_inputs`` random *correctly
classified* test inputs of the victim (PROTOCOLS 4, chosen by ``seed`` with
:func:`~nasrisk.trials.attacks.targets.select_correct`), so the PGD and NES trials of one
victim and seed attack the same inputs with the same targets. ``pgd_overlap`` needs masks that
line up across models, so it attacks a model-independent set: ``n_inputs`` test indices drawn
by ``seed`` alone (the same for every model of a dataset at the same test-split size).

Overlap convention: ``fooled[i]`` is True only when the victim classifies input ``i``
correctly before the attack *and* the attack reaches its target. An input the model already
misclassifies is not attacked and counts as not fooled (``correct`` in ``overlap.npz`` tells
them apart), so a model's count of fooled inputs is never inflated by its clean errors.
``overlap_fooled`` = fooled / all indices, ``overlap_asr`` = fooled / correctly classified.

For PGD and NES an input succeeds when any iterate within the maximum iterations reaches the
target (Pang et al. 2022, Sec. 3.2) and is kept at its first success.

Each finished part (a PGD case, an NES case, the sweep) is saved through ``ctx.save_state``, so
a retried trial does not redo it. Every trial also writes ``<attack>.npz`` (indices into the
test split, per-input success masks, targets, and for ``pgd_targeted`` and ``nes`` the
per-input query counts ``queries_m`` / ``queries_l``) as an artifact.

Deviations: the protocol runs the eps sweep and the overlap study on CIFAR10 only; the trial
accepts any dataset (the study chooses). ``params`` defaults to the victim's parameter set;
set it explicitly to attack one victim with both settings. ``nes_queries_per_estimate``
shrinks NES's estimates (the smoke profile does, CPU time) and keeps the parameter set's
iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..attacks.nes import nes
from ..attacks.pgd import pgd_eps_sweep, pgd_overlap_attack, pgd_targeted_case
from ..attacks.targets import AttackResult, clean_logits, select_correct
from ..context import TrialContext
from ..data import ImageData, load_dataset, to_float
from ..registry import MODELS, TRIAL_KINDS
from ..victims import VictimSpec, ensure_victim, victim_data
from .base import TrialKind

AttackName = Literal["pgd_targeted", "pgd_sweep", "nes", "pgd_overlap"]
SWEEP_EPS_255 = (1, 2, 4, 8, 16)  # PROTOCOLS 4, PGD untargeted sweep


class AttackConfig(BaseModel):
    """One attack trial. ``nes_queries_per_estimate`` None = the ``params`` default
    (``paper`` 400, ``artifact`` 100); the NES iterations are always the parameter set's
    (``paper`` 3 most-likely / 7 least-likely, ``artifact`` 7)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    victim: VictimSpec
    attack: AttackName
    n_inputs: int = Field(1000, ge=1)
    params: Literal["paper", "artifact"] = "paper"
    seed: int = 0
    nes_queries_per_estimate: int | None = Field(None, ge=2)
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _drop_other_attacks_fields(cls, data: Any) -> Any:
        # NES settings mean nothing to a PGD trial: leave them at their defaults there, so a
        # stage-wide NES setting neither changes the PGD trials' keys (no rerun) nor shows up
        # among their MLflow params as if it had mattered
        if isinstance(data, dict) and data.get("attack") != "nes":
            data = {k: v for k, v in data.items() if not k.startswith("nes_")}
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
    def _nes_even(self) -> AttackConfig:
        q = self.nes_queries_per_estimate
        if q is not None and q % 2:
            raise ValueError(f"nes_queries_per_estimate must be even (antithetic pairs), got {q}")
        return self


def _cached(ctx: TrialContext, key: str, part: str, compute: Callable[[], dict]) -> dict:
    """``compute()`` once per trial: its result is saved under ``key``/``part`` and reused by
    a retried attempt."""
    state = ctx.load_state(key) or {}
    if part in state:
        return state[part]
    res = compute()
    scalars = {k: v for k, v in res.items() if isinstance(v, float) and math.isfinite(v)}
    ctx.save_state(key, {**state, part: res}, metrics=scalars)
    return res


def _masks(r: AttackResult) -> dict[str, Any]:
    out: dict[str, Any] = {"success": r.success.bool()}
    if r.targets is not None:
        out["targets"] = r.targets.long()
    if r.queries is not None:
        out["queries"] = r.queries.long()
    return out


def _mean(x: torch.Tensor) -> float:
    return x.float().mean().item() if len(x) else math.nan


def _targeted(model, x, y, cfg: AttackConfig, ctx: TrialContext, key: str) -> tuple[dict, dict]:
    metrics, arrays = {}, {}
    for case, tag in (("most", "m"), ("least", "l")):
        def run(case=case, tag=tag) -> dict:
            r = pgd_targeted_case(model, x, y, case=case, params=cfg.params, seed=cfg.seed,
                                  batch_size=cfg.batch_size)
            return {f"asr_{tag}": r.asr, f"pgd_queries_{tag}": _mean(r.queries),
                    **{f"{k}_{tag}": v for k, v in _masks(r).items()}}
        res = _cached(ctx, key, case, run)
        metrics.update({k: v for k, v in res.items() if not isinstance(v, torch.Tensor)})
        arrays.update({k: v for k, v in res.items() if isinstance(v, torch.Tensor)})
        ctx.progress(f"pgd {case}-likely: ASR {res[f'asr_{tag}']:.3f}")
    return metrics, arrays


def _sweep(model, x, y, cfg: AttackConfig, ctx: TrialContext, key: str) -> tuple[dict, dict]:
    def run() -> dict:
        r = pgd_eps_sweep(model, x, y, eps_list=tuple(e / 255 for e in SWEEP_EPS_255),
                          seed=cfg.seed, batch_size=cfg.batch_size)
        out: dict[str, Any] = dict(r.metrics(prefix="asr_eps_"))
        for e, res in zip(SWEEP_EPS_255, r.results, strict=True):
            out[f"success_eps_{e}"] = res.success.bool()
        return out
    res = _cached(ctx, key, "sweep", run)
    metrics = {k: v for k, v in res.items() if not isinstance(v, torch.Tensor)}
    ctx.progress(f"pgd sweep: {metrics}")
    return metrics, {k: v for k, v in res.items() if isinstance(v, torch.Tensor)}


def _nes(model, x, y, cfg: AttackConfig, ctx: TrialContext, key: str) -> tuple[dict, dict]:
    metrics, arrays = {}, {}
    for case, tag in (("most", "m"), ("least", "l")):
        def run(case=case, tag=tag) -> dict:
            r = nes(model, x, y, case=case, params=cfg.params,
                    queries_per_estimate=cfg.nes_queries_per_estimate, seed=cfg.seed)
            q = r.queries.float()
            return {f"nes_asr_{tag}": r.asr, f"nes_queries_{tag}": _mean(q),
                    f"nes_queries_success_{tag}": _mean(q[r.success]),
                    **{f"{k}_{tag}": v for k, v in _masks(r).items()}}
        res = _cached(ctx, key, case, run)
        metrics.update({k: v for k, v in res.items() if not isinstance(v, torch.Tensor)})
        arrays.update({k: v for k, v in res.items() if isinstance(v, torch.Tensor)})
        ctx.progress(f"nes {case}-likely: ASR {res[f'nes_asr_{tag}']:.3f}, "
                     f"mean queries {res[f'nes_queries_{tag}']:.0f}")
    return metrics, arrays


def overlap_indices(n_test: int, n_inputs: int, seed: int) -> torch.Tensor:
    """The model-independent test indices of the overlap study: ``n_inputs`` of
    ``range(n_test)`` drawn by ``seed`` alone, sorted (PROTOCOLS 4 "PGD overlap")."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_test, generator=gen)[:n_inputs].sort().values


def _overlap(model, data: ImageData, cfg: AttackConfig, ctx: TrialContext,
             key: str) -> tuple[dict, dict]:
    def run() -> dict:
        idx = overlap_indices(len(data.y_test), cfg.n_inputs, cfg.seed)
        x, y = to_float(data.x_test[idx]), data.y_test[idx]
        correct = clean_logits(model, x, cfg.batch_size).argmax(1) == y
        fooled = torch.zeros(len(idx), dtype=torch.bool)
        targets = torch.full((len(idx),), -1, dtype=torch.long)
        if correct.any():
            r = pgd_overlap_attack(model, x[correct], y[correct], params=cfg.params,
                                   seed=cfg.seed, batch_size=cfg.batch_size)
            fooled[correct] = r.success.bool()
            targets[correct] = r.targets.long()
        return {"overlap_fooled": _mean(fooled), "overlap_clean_acc": _mean(correct),
                "overlap_asr": _mean(fooled[correct]), "indices": idx.long(),
                "fooled": fooled, "correct": correct.bool(), "targets": targets}
    res = _cached(ctx, key, "overlap", run)
    metrics = {k: v for k, v in res.items() if not isinstance(v, torch.Tensor)}
    ctx.progress(f"pgd overlap: {metrics}")
    return metrics, {k: v for k, v in res.items() if isinstance(v, torch.Tensor)}


def run_attack(config: dict, ctx: TrialContext) -> dict[str, float]:
    """Run one attack of PROTOCOLS 4 on one victim (see the module docstring)."""
    cfg = AttackConfig.model_validate(config)
    spec = cfg.victim
    full = load_dataset(spec.dataset, root=ctx.data_root, download=ctx.download)
    model, record = ensure_victim(spec, ctx, data=full)
    data = victim_data(spec, ctx, full)  # the test split the victim's acc is measured on
    model.eval()
    out: dict[str, float] = {"victim_acc": float(record["acc"]),
                             "victim_trained": float(record.get("source") == "trained")}
    key = f"attack/{cfg.attack}"
    if cfg.attack == "pgd_overlap":
        metrics, arrays = _overlap(model, data, cfg, ctx, key)
        out["n_attacked"] = float(arrays["correct"].sum())
        filename = "overlap.npz"
    else:
        x, y, idx = select_correct(model, data.x_test, data.y_test, cfg.n_inputs, cfg.seed)
        ctx.progress(f"{cfg.attack}: {len(idx)} correctly classified inputs "
                     f"(asked {cfg.n_inputs})")
        run = {"pgd_targeted": _targeted, "pgd_sweep": _sweep, "nes": _nes}[cfg.attack]
        metrics, arrays = run(model, x, y, cfg, ctx, key)
        arrays = {"indices": idx.long(), **arrays}
        out["n_attacked"] = float(len(idx))
        filename = f"{cfg.attack}.npz"
    out.update(metrics)
    np.savez(ctx.artifact_dir / filename, **{k: v.numpy() for k, v in arrays.items()})
    return out


def extra_params(cfg: AttackConfig) -> dict[str, object]:
    """Logged beside the config so the report can group runs without parsing nested keys."""
    return {"victim_key": cfg.victim.key(), "model": cfg.victim.model,
            "dataset": cfg.victim.dataset, "family": MODELS.meta(cfg.victim.model).get("family", ""),
            "attack": cfg.attack}


def trial_name(cfg: AttackConfig) -> str:
    return f"{cfg.attack} {cfg.victim.model}@{cfg.victim.dataset}"  # "x0007 pgd darts@cifar10"


_COMMON = ("victim_acc", "victim_trained", "n_attacked")
_BY_ATTACK = {
    "pgd_targeted": ("asr_m", "asr_l", "pgd_queries_m", "pgd_queries_l"),
    "pgd_sweep": tuple(f"asr_eps_{e}" for e in SWEEP_EPS_255),
    "nes": ("nes_asr_m", "nes_asr_l", "nes_queries_m", "nes_queries_l",
            "nes_queries_success_m", "nes_queries_success_l"),
    "pgd_overlap": ("overlap_fooled", "overlap_clean_acc", "overlap_asr"),
}


def metric_names(cfg: AttackConfig) -> tuple[str, ...]:
    return (*_COMMON, *_BY_ATTACK[cfg.attack])


TRIAL_KINDS.register("attack", TrialKind(
    fn=run_attack, config_model=AttackConfig,
    metrics=(*_COMMON, *(m for ms in _BY_ATTACK.values() for m in ms)),
    metrics_for=metric_names, name=trial_name, name_prefix="x", params=extra_params,
    description="one evasion attack on one victim from the store"))
