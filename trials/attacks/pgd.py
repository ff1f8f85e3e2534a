"""L-inf projected gradient descent (Madry et al., ICLR 2018) with the settings of PROTOCOLS 4.

Threat model: white-box, L-inf ball of radius ``eps`` around a [0, 1] input, clamped to
[0, 1]; targeted (most-/least-likely class, Pang et al., "On the Security Risks of AutoML",
USENIX Security 2022, Sec. 4 and Table 3) or untargeted (the eps sweep and the overlap study).

Registered in ATTACKS for the ``attack`` trial (:mod:`.entry`): ``pgd_targeted``
(:func:`pgd_targeted_case`, both cases), ``pgd_sweep`` (:func:`pgd_eps_sweep`) and
``pgd_overlap`` (:func:`pgd_overlap_attack` on model-independent inputs).

Hand-written rather than ART's ``ProjectedGradientDescentPyTorch``: ``bench/bench_attacks.py``
runs both on the same model and inputs. Measured on 2 CPU cores shared with other jobs (load
average ~8, so timings are noisy; small CNN, 100-200 inputs): without random start and with
``stop_at_success=False`` both give the same adversarial inputs (max |dx| < 1e-8) and success
verdicts; ART/ours time ratio 1.2-1.8 for one run and 1.6-2.1 for 5 restarts in most runs,
with one outlier run at 0.67. Both are dominated by the model's forward/backward, so speed
alone is a weak argument; the decision rests on what ART cannot do without wrapping: success
at *any* iteration with the input kept at its first success (ART judges the last iterate and
overwrites with later successful restarts), the ``artifact`` target-probability criterion,
restarts only for inputs not yet fooled, and no numpy round trip per batch on a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..registry import ATTACKS
from .entry import (
    AttackCommon,
    AttackEntry,
    AttackInputs,
    ParamSet,
    cached_part,
    masks,
    mean,
    split,
)
from .targets import AttackResult, Case, clean_logits, is_success, model_device, select_targets


class PGDParams(BaseModel):
    """One PGD setting (PROTOCOLS 4 table, PGD targeted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eps: float = Field(8 / 255, ge=0)
    step: float = Field(2 / 255, ge=0)
    iters: int = Field(7, ge=0)
    restarts: int = Field(1, ge=1)
    random_start: bool = True
    success_prob: float | None = None


def pgd_params(case: Case, params: ParamSet = "paper") -> PGDParams:
    """PROTOCOLS 4: ``paper`` = eps 8/255, step 2/255, 5 random restarts, 3 iterations
    (most-likely) / 7 (least-likely); ``artifact`` = same eps and step, 7 iterations both
    cases, no random start, success also needs target probability > 0.99. Both: success at
    any iteration within ``iters`` (:func:`pgd`)."""
    if case not in ("most", "least"):
        raise ValueError(f"case must be 'most' or 'least', got {case!r}")
    if params == "paper":
        return PGDParams(iters=3 if case == "most" else 7, restarts=5, random_start=True)
    if params == "artifact":
        return PGDParams(iters=7, restarts=1, random_start=False, success_prob=0.99)
    raise ValueError(f"params must be 'paper' or 'artifact', got {params!r}")


def _pgd_run(model: nn.Module, x0: torch.Tensor, label: torch.Tensor, y: torch.Tensor, *,
             targets: torch.Tensor | None, eps: float, step: float, iters: int, targeted: bool,
             random_start: bool, success_prob: float | None, stop_at_success: bool,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PGD run from ``x0`` (one restart); ``label`` is the target or the true class.

    Returns ``(x_adv, success, queries)``. The forward pass at iterate ``t`` (``t = 0`` is the
    start point) both judges it and, for ``t < iters``, gives the gradient of the next step,
    so judging every iterate costs no extra query: an input is evaluated at most
    ``iters + 1`` times. With ``stop_at_success`` an input stops (and keeps its iterate) at
    its first success; without, every input runs all ``iters`` steps and only the last
    iterate is judged.
    """
    if random_start and eps > 0:
        noise = torch.rand(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        xa = (x0 + (2 * noise - 1) * eps).clamp_(0, 1)
    else:
        xa = x0.clone()
    # descend the loss to the target, ascend the loss of the true class
    sign = -1.0 if targeted else 1.0
    lo, hi = (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)
    ok = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
    queries = torch.zeros(len(x0), dtype=torch.long, device=x0.device)
    act = torch.arange(len(x0), device=x0.device)
    for t in range(iters + 1):
        if len(act) == 0:
            break
        last = t == iters
        xs = xa[act].detach().requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            logits = model(xs).float()
        queries[act] += 1
        if stop_at_success or last:
            hit = is_success(logits.detach(), y[act],
                             targets=targets[act] if targets is not None else None,
                             success_prob=success_prob)
        else:
            hit = torch.zeros(len(act), dtype=torch.bool, device=x0.device)
        ok[act] = hit
        if last:
            break
        # per-sample losses are independent in eval mode, so the sum's gradient is per input
        loss = F.cross_entropy(logits, label[act], reduction="sum")
        (g,) = torch.autograd.grad(loss, xs)
        new = torch.minimum(torch.maximum(xs.detach() + sign * step * g.sign(), lo[act]),
                            hi[act])
        keep = act[~hit]
        xa[keep] = new[~hit]
        act = keep
    return xa, ok, queries


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float,
        iters: int, targeted: bool, targets: torch.Tensor | None = None,
        random_start: bool = True, restarts: int = 1, success_prob: float | None = None,
        stop_at_success: bool = True, seed: int = 0, batch_size: int = 256) -> AttackResult:
    """L-inf PGD on [0, 1] inputs ``x`` with labels ``y`` (Madry et al. 2018).

    Each iteration steps ``step * sign(grad)`` of the summed cross-entropy (towards
    ``targets`` when ``targeted``, away from ``y`` otherwise), then projects onto the
    ``eps``-ball of ``x`` intersected with [0, 1]. The random start is uniform in the ball.
    Success: argmax == target (targeted) or != ``y``, plus target probability >
    ``success_prob`` when set (the ``artifact`` criterion), at *any* iterate of a restart,
    the start point included (Pang et al. 2022, Sec. 3.2, "within maximum iterations"); an
    input stops at its first successful iterate and keeps it. With ``restarts > 1`` only
    inputs not yet fooled are restarted, so an input keeps its first success; inputs that
    never succeed keep the last iterate of the last restart. ``stop_at_success=False``
    judges only the last iterate of each restart (Madry et al.'s and ART's convention; for
    comparisons). The model runs in eval mode (restored after).

    ``result.queries``: forward passes of the model per input inside this call, at most
    ``restarts * (iters + 1)`` (one per iterate judged; the last iterate's pass has no
    backward). The wrappers that pick targets from the clean output add that 1 query.

    Deviations: restarts without random start are identical, so only one is run.
    """
    if targeted and targets is None:
        raise ValueError("targeted PGD needs targets")
    device = model_device(model)
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    n_runs = restarts if random_start and eps > 0 else 1
    x_adv, success, spent = [], [], []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device).float()
            yb = y[i:i + batch_size].to(device)
            tb = targets[i:i + batch_size].to(device) if targeted else None
            label = tb if targeted else yb
            best, done = xb.clone(), torch.zeros(len(xb), dtype=torch.bool, device=device)
            queries = torch.zeros(len(xb), dtype=torch.long, device=device)
            for _ in range(n_runs):
                todo = torch.nonzero(~done).flatten()
                if len(todo) == 0:
                    break
                xa, ok, q = _pgd_run(model, xb[todo], label[todo], yb[todo],
                                     targets=tb[todo] if targeted else None, eps=eps,
                                     step=step, iters=iters, targeted=targeted,
                                     random_start=random_start, success_prob=success_prob,
                                     stop_at_success=stop_at_success, gen=gen)
                best[todo] = xa
                done[todo] = ok
                queries[todo] += q
            x_adv.append(best.cpu())
            success.append(done.cpu())
            spent.append(queries.cpu())
    finally:
        model.train(was_training)
    success_t = torch.cat(success) if success else torch.zeros(0, dtype=torch.bool)
    return AttackResult(
        x_adv=torch.cat(x_adv) if x_adv else x.float().cpu(), success=success_t,
        asr=success_t.float().mean().item() if len(success_t) else float("nan"),
        queries=torch.cat(spent) if spent else torch.zeros(0, dtype=torch.long),
        targets=targets.cpu() if targets is not None else None,
    )


def _with_clean_query(r: AttackResult) -> AttackResult:
    """``r`` with the clean query that picked the targets added to every input's count."""
    return dataclasses.replace(r, queries=r.queries + 1)


def pgd_targeted_case(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, case: Case = "most",
                      params: ParamSet = "paper", seed: int = 0,
                      batch_size: int = 256) -> AttackResult:
    """Targeted PGD of PROTOCOLS 4 (Pang et al. 2022, Table 3, ASR(M) / ASR(L)): the target is
    the 2nd most likely (``case="most"``) or least likely (``"least"``) class of the clean
    input; settings from :func:`pgd_params` for ``params`` = ``"paper"`` or ``"artifact"``.
    ``x`` should be correctly classified inputs (:func:`~.targets.select_correct`). Success at
    any iteration within the maximum (:func:`pgd`); ``result.queries`` = 1 clean query +
    forward passes, at most ``1 + restarts * (iters + 1)`` (``paper``: 21 most-likely, 41
    least-likely; ``artifact``: 9)."""
    p = pgd_params(case, params)
    targets = select_targets(clean_logits(model, x, batch_size), case)
    return _with_clean_query(pgd(
        model, x, y, eps=p.eps, step=p.step, iters=p.iters, targeted=True, targets=targets,
        random_start=p.random_start, restarts=p.restarts, success_prob=p.success_prob,
        seed=seed, batch_size=batch_size))


@dataclass(frozen=True)
class EpsSweepResult:
    """Untargeted PGD at each eps: ``eps[i]`` -> ``results[i]``."""

    eps: tuple[float, ...]
    results: tuple[AttackResult, ...]

    @property
    def asr(self) -> tuple[float, ...]:
        return tuple(r.asr for r in self.results)

    def metrics(self, prefix: str = "asr_eps") -> dict[str, float]:
        """``{"asr_eps<k>": ASR}`` with ``k`` = eps in 1/255 units."""
        return {f"{prefix}{round(e * 255, 3):g}": r.asr
                for e, r in zip(self.eps, self.results, strict=True)}


def pgd_eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                  eps_list: Sequence[float] = tuple(e / 255 for e in (1, 2, 4, 8, 16)),
                  step_ratio: float = 1 / 3, iters: int = 7, random_start: bool = True,
                  seed: int = 0, batch_size: int = 256) -> EpsSweepResult:
    """Untargeted PGD ASR per eps (PROTOCOLS 4 "PGD untargeted sweep"; Pang et al. 2022,
    Fig. 4): eps in {1, 2, 4, 8, 16}/255, step = eps/3.

    Deviations: the protocol gives no iteration count; we use 7 (the count of the study's
    other PGD settings and of its adversarial training), enough at step eps/3 to cross the
    ball twice. One random start, drawn with the same seed for every eps (so the sweep is a
    controlled comparison).
    """
    results = tuple(
        pgd(model, x, y, eps=e, step=e * step_ratio, iters=iters, targeted=False,
            random_start=random_start, seed=seed, batch_size=batch_size)
        for e in eps_list)
    return EpsSweepResult(eps=tuple(float(e) for e in eps_list), results=results)


def pgd_overlap_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                       eps: float = 4 / 255, case: Case = "least", params: ParamSet = "paper",
                       seed: int = 0, batch_size: int = 256) -> AttackResult:
    """Targeted PGD for the overlap study (PROTOCOLS 4 "PGD overlap": eps 4/255, least
    likely); ``result.success`` is the per-input fooled mask (the report counts, per input,
    how many models fool it: :func:`nasrisk.analysis.reports.automl_data.overlap_counts`).

    Deviations: the protocol fixes only eps; the step keeps the paper's ratio step = eps/4
    and iterations/restarts are those of ``params`` for ``case``. Use the same inputs for
    every model (e.g. a fixed random test subset) so masks line up.
    """
    p = pgd_params(case, params)
    targets = select_targets(clean_logits(model, x, batch_size), case)
    return _with_clean_query(pgd(
        model, x, y, eps=eps, step=eps / 4, iters=p.iters, targeted=True, targets=targets,
        random_start=p.random_start, restarts=p.restarts, success_prob=p.success_prob,
        seed=seed, batch_size=batch_size))


# -- the attack trial's PGD attacks (ATTACKS entries; see :mod:`.entry`) -----------------------

SWEEP_EPS_255 = (1, 2, 4, 8, 16)  # PROTOCOLS 4, PGD untargeted sweep
_CASES = (("most", "m"), ("least", "l"))


def run_targeted(model: nn.Module, inputs: AttackInputs, common: AttackCommon, options: Any,
                 ctx: Any, key: str) -> tuple[dict, dict]:
    """Both targeted cases (:func:`pgd_targeted_case`): ``asr_m``/``asr_l`` and
    ``pgd_queries_m``/``_l``, the mean model evaluations per input (1 clean query + one
    forward pass per iterate judged)."""
    metrics, arrays = {}, {}
    for case, tag in _CASES:
        def run(case=case, tag=tag) -> dict:
            r = pgd_targeted_case(model, inputs.x, inputs.y, case=case, params=common.params,
                                  seed=common.seed, batch_size=common.batch_size)
            return {f"asr_{tag}": r.asr, f"pgd_queries_{tag}": mean(r.queries),
                    **masks(r, f"_{tag}")}
        m, a = split(cached_part(ctx, key, case, run))
        metrics.update(m)
        arrays.update(a)
        ctx.progress(f"pgd {case}-likely: ASR {m[f'asr_{tag}']:.3f}")
    return metrics, arrays


def run_sweep(model: nn.Module, inputs: AttackInputs, common: AttackCommon, options: Any,
              ctx: Any, key: str) -> tuple[dict, dict]:
    """Untargeted PGD per eps of :data:`SWEEP_EPS_255` (:func:`pgd_eps_sweep`):
    ``asr_eps_<k>`` and the per-input masks ``success_eps_<k>``."""
    def run() -> dict:
        r = pgd_eps_sweep(model, inputs.x, inputs.y, eps_list=tuple(e / 255 for e in SWEEP_EPS_255),
                          seed=common.seed, batch_size=common.batch_size)
        out: dict[str, Any] = dict(r.metrics(prefix="asr_eps_"))
        for e, res in zip(SWEEP_EPS_255, r.results, strict=True):
            out[f"success_eps_{e}"] = res.success.bool()
        return out
    metrics, arrays = split(cached_part(ctx, key, "sweep", run))
    ctx.progress(f"pgd sweep: {metrics}")
    return metrics, arrays


def run_overlap(model: nn.Module, inputs: AttackInputs, common: AttackCommon, options: Any,
                ctx: Any, key: str) -> tuple[dict, dict]:
    """:func:`pgd_overlap_attack` on the correctly classified ones of the fixed inputs.

    ``fooled[i]`` is True only when the victim classifies input ``i`` correctly before the
    attack *and* the attack reaches its target: a misclassified input is not attacked and
    counts as not fooled (``correct`` in the artifact tells them apart), so a model's count
    of fooled inputs is never inflated by its clean errors. ``overlap_fooled`` = fooled / all
    inputs, ``overlap_asr`` = fooled / correctly classified."""
    correct = inputs.correct

    def run() -> dict:
        fooled = torch.zeros(len(correct), dtype=torch.bool)
        targets = torch.full((len(correct),), -1, dtype=torch.long)
        if correct.any():
            r = pgd_overlap_attack(model, inputs.x[correct], inputs.y[correct],
                                   params=common.params, seed=common.seed,
                                   batch_size=common.batch_size)
            fooled[correct] = r.success.bool()
            targets[correct] = r.targets.long()
        return {"overlap_fooled": mean(fooled), "overlap_clean_acc": mean(correct),
                "overlap_asr": mean(fooled[correct]), "fooled": fooled, "targets": targets}
    metrics, arrays = split(cached_part(ctx, key, "overlap", run))
    ctx.progress(f"pgd overlap: {metrics}")
    return metrics, arrays


ATTACKS.register("pgd_targeted", AttackEntry(
    run=run_targeted, metrics=("asr_m", "asr_l", "pgd_queries_m", "pgd_queries_l"),
    threat="white-box", source="PROTOCOLS 4; Pang et al. 2022, Table 3",
    description="targeted PGD, most- and least-likely target"))
ATTACKS.register("pgd_sweep", AttackEntry(
    run=run_sweep, metrics=tuple(f"asr_eps_{e}" for e in SWEEP_EPS_255),
    threat="white-box", source="PROTOCOLS 4; Pang et al. 2022, Fig. 4",
    description="untargeted PGD at eps 1, 2, 4, 8, 16 /255"))
ATTACKS.register("pgd_overlap", AttackEntry(
    run=run_overlap, metrics=("overlap_fooled", "overlap_clean_acc", "overlap_asr"),
    inputs="fixed", artifact="overlap.npz", threat="white-box",
    source="PROTOCOLS 4; Pang et al. 2022, Fig. 5",
    description="targeted PGD (eps 4/255, least likely) on model-independent inputs"))
