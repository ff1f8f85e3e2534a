"""NES black-box targeted attack (Ilyas et al., "Black-box Adversarial Attacks with Limited
Queries and Information", ICML 2018) with the settings of PROTOCOLS 4.

Threat model: the attacker sees only the output probabilities of the model (score-based
black box), L-inf ball eps = 8/255 around a [0, 1] input; targets as for PGD (most-/least-
likely class, Pang et al., "On the Security Risks of AutoML", USENIX Security 2022, Sec. 4).

Registered in ATTACKS as ``nes`` for the ``attack`` trial (:mod:`.entry`), with the option
``queries_per_estimate`` (:class:`NESOptions`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
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


class NESParams(BaseModel):
    """One NES setting (PROTOCOLS 4 table, NES row)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eps: float = Field(8 / 255, ge=0)
    step: float = Field(2 / 255, ge=0)
    iters: int = Field(7, ge=0)
    queries_per_estimate: int = Field(400, ge=2)
    sigma: float = Field(1e-3, gt=0)
    success_prob: float | None = None

    @model_validator(mode="after")
    def _even(self) -> NESParams:
        if self.queries_per_estimate % 2:
            raise ValueError("queries_per_estimate must be even (antithetic pairs), got "
                             f"{self.queries_per_estimate}")
        return self

    def max_queries(self) -> int:
        """The most model queries one input can cost: 1 clean query + ``iters`` x
        (estimate + 1 success check of the new iterate)."""
        return 1 + self.iters * (self.queries_per_estimate + 1)


def nes_params(case: Case, params: ParamSet = "paper") -> NESParams:
    """PROTOCOLS 4, NES: ``paper`` = the PGD setting ("same setting of Figure 2": eps 8/255,
    step 2/255, 3 iterations most-likely / 7 least-likely) with one gradient estimate of 400
    queries per iteration; ``artifact`` = 7 iterations of 100 queries, success also needs
    target probability > 0.99. sigma 1e-3 in both."""
    if case not in ("most", "least"):
        raise ValueError(f"case must be 'most' or 'least', got {case!r}")
    if params == "paper":
        return NESParams(iters=3 if case == "most" else 7, queries_per_estimate=400)
    if params == "artifact":
        return NESParams(iters=7, queries_per_estimate=100, success_prob=0.99)
    raise ValueError(f"params must be 'paper' or 'artifact', got {params!r}")


def _target_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """f(x) = -log p_target(x): cross-entropy of the output probabilities to the target."""
    logp = model(x).float().log_softmax(1)
    return -logp.gather(1, targets[:, None])[:, 0]


@torch.no_grad()
def nes_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, *, queries: int,
                 sigma: float = 1e-3, generator: torch.Generator | None = None,
                 forward_batch: int = 4096) -> torch.Tensor:
    """NES estimate of d f / d x for each input of ``x`` (PROTOCOLS 4; Ilyas et al. 2018,
    Eq. 2 with antithetic sampling): ``g = sum_j (f(x + s u_j) - f(x - s u_j)) u_j / (s n)``
    over ``n/2`` antithetic Gaussian pairs ``u_j ~ N(0, I)``, ``n = queries`` model
    evaluations per input, ``f`` = :func:`_target_loss`. All queries of all inputs go
    through the model in batches of ``forward_batch`` images.

    Deviations: query points are not clamped to [0, 1] (s = 1e-3 leaves them at most a few
    thousandths outside, and clamping would break the antithetic symmetry).
    """
    if queries < 2 or queries % 2:
        raise ValueError(f"queries per estimate must be even and >= 2, got {queries}")
    b, pairs = len(x), queries // 2
    u = torch.randn((b, pairs, *x.shape[1:]), generator=generator, device=x.device,
                    dtype=x.dtype)
    pts = torch.cat([x[:, None] + sigma * u, x[:, None] - sigma * u], 1).flatten(0, 1)
    tgt = targets.repeat_interleave(2 * pairs)
    f = torch.cat([_target_loss(model, pts[i:i + forward_batch], tgt[i:i + forward_batch])
                   for i in range(0, len(pts), forward_batch)]).view(b, 2, pairs)
    diff = f[:, 0] - f[:, 1]  # (b, pairs)
    return torch.einsum("bp,bp...->b...", diff, u) / (sigma * queries)


def nes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
        targets: torch.Tensor | None = None, case: Case = "most", params: ParamSet = "paper",
        queries_per_estimate: int | None = None, iters: int | None = None,
        eps: float | None = None, step: float | None = None, seed: int = 0,
        batch_size: int = 32, forward_batch: int = 4096) -> AttackResult:
    """Targeted NES attack (PROTOCOLS 4 "NES"; Ilyas et al. 2018, Alg. 1 without the
    partial-information part), settings from :func:`nes_params` for ``case`` and ``params``.

    Query 0 is the clean input (it picks the targets by the ``case`` rule when ``targets`` is
    None, and judges iterate 0). Then per iteration: estimate the gradient of
    f = -log p_target with :func:`nes_gradient` (``queries_per_estimate`` queries), step
    ``x <- x - step * sign(g)``, project onto the ``eps``-ball and [0, 1], and query the new
    iterate once to judge it. Success: argmax == target (``artifact``: and target probability
    > 0.99) at *any* iterate within ``iters`` (Pang et al. 2022, Sec. 3.2, "within maximum
    iterations"); an input stops at its first success and keeps that iterate.
    ``result.queries`` counts every model query spent on an input: 1 clean + k x (estimate
    + 1) after k iterations, so at most :meth:`NESParams.max_queries`
    (``paper``: 1,204 most-likely, 2,808 least-likely; ``artifact``: 708), which a failed
    input spends in full.

    ``queries_per_estimate``, ``iters``, ``eps`` and ``step`` override the parameter set
    (None = keep it): the smoke profile shrinks ``queries_per_estimate`` only.

    Deviations: the paper counts 400 queries per iteration; the success check of each
    iterate is one more query, counted here (a black-box attacker must query a point to
    know it succeeded).
    """
    p = nes_params(case, params)
    over = {"queries_per_estimate": queries_per_estimate, "iters": iters, "eps": eps,
            "step": step}
    p = NESParams(**{**p.model_dump(), **{k: v for k, v in over.items() if v is not None}})
    n = p.queries_per_estimate
    device = model_device(model)
    was_training = model.training
    model.eval()
    clean = clean_logits(model, x, forward_batch)  # query 0 of every input
    if targets is None:
        targets = select_targets(clean, case)
    gen = torch.Generator(device=device).manual_seed(seed)
    out_x, out_ok, out_q = [], [], []
    try:
        for i in range(0, len(x), batch_size):
            x0 = x[i:i + batch_size].to(device).float()
            tb = targets[i:i + batch_size].to(device)
            yb = y[i:i + batch_size].to(device)
            xa = x0.clone()
            done = is_success(clean[i:i + batch_size].to(device), yb, targets=tb,
                              success_prob=p.success_prob)
            queries = torch.ones(len(x0), dtype=torch.long, device=device)
            lo, hi = (x0 - p.eps).clamp(min=0), (x0 + p.eps).clamp(max=1)
            for _ in range(p.iters):
                act = torch.nonzero(~done).flatten()
                if len(act) == 0:
                    break
                g = nes_gradient(model, xa[act], tb[act], queries=n, sigma=p.sigma,
                                 generator=gen, forward_batch=forward_batch)
                new = xa[act] - p.step * g.sign()
                xa[act] = torch.minimum(torch.maximum(new, lo[act]), hi[act])
                with torch.no_grad():
                    ok = is_success(model(xa[act]), yb[act], targets=tb[act],
                                    success_prob=p.success_prob)
                queries[act] += n + 1
                done[act] = ok
            out_x.append(xa.cpu())
            out_ok.append(done.cpu())
            out_q.append(queries.cpu())
    finally:
        model.train(was_training)
    ok_t = torch.cat(out_ok) if out_ok else torch.zeros(0, dtype=torch.bool)
    return AttackResult(
        x_adv=torch.cat(out_x) if out_x else x.float().cpu(), success=ok_t,
        asr=ok_t.float().mean().item() if len(ok_t) else math.nan,
        queries=torch.cat(out_q) if out_q else torch.zeros(0, dtype=torch.long),
        targets=targets.cpu(),
    )


class NESOptions(BaseModel):
    """The ``nes`` entry's options: ``queries_per_estimate`` None = the parameter set's
    (``paper`` 400, ``artifact`` 100); the iterations are always the parameter set's
    (``paper`` 3 most-likely / 7 least-likely, ``artifact`` 7). The smoke profile shrinks the
    estimates (CPU time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queries_per_estimate: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _even(self) -> NESOptions:
        q = self.queries_per_estimate
        if q is not None and q % 2:
            raise ValueError(f"queries_per_estimate must be even (antithetic pairs), got {q}")
        return self


def run_nes(model: nn.Module, inputs: AttackInputs, common: AttackCommon, options: NESOptions,
            ctx: Any, key: str) -> tuple[dict, dict]:
    """Both cases of :func:`nes`: ``nes_asr_m``/``_l``; ``nes_queries_m``/``_l``, the mean
    model queries per input, successful or not (1 clean query + (estimate + 1 success
    check) per iteration run, at most :meth:`NESParams.max_queries`), and
    ``nes_queries_success_m``/``_l``, the mean over the successful inputs (NaN if none)."""
    metrics, arrays = {}, {}
    for case, tag in (("most", "m"), ("least", "l")):
        def run(case=case, tag=tag) -> dict:
            r = nes(model, inputs.x, inputs.y, case=case, params=common.params,
                    queries_per_estimate=options.queries_per_estimate, seed=common.seed)
            q = r.queries.float()
            return {f"nes_asr_{tag}": r.asr, f"nes_queries_{tag}": mean(q),
                    f"nes_queries_success_{tag}": mean(q[r.success]), **masks(r, f"_{tag}")}
        m, a = split(cached_part(ctx, key, case, run))
        metrics.update(m)
        arrays.update(a)
        ctx.progress(f"nes {case}-likely: ASR {m[f'nes_asr_{tag}']:.3f}, "
                     f"mean queries {m[f'nes_queries_{tag}']:.0f}")
    return metrics, arrays


ATTACKS.register("nes", AttackEntry(
    run=run_nes, options=NESOptions,
    metrics=("nes_asr_m", "nes_asr_l", "nes_queries_m", "nes_queries_l",
             "nes_queries_success_m", "nes_queries_success_l"),
    threat="black-box (scores)", source="PROTOCOLS 4; Ilyas et al. 2018",
    description="NES score-based black-box targeted attack, most- and least-likely target"))
