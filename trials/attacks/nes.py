"""NES black-box targeted attack (Ilyas et al., "Black-box Adversarial Attacks with Limited
Queries and Information", ICML 2018) with the settings of PROTOCOLS 4.

Threat model: the attacker sees only the output probabilities of the model (score-based
black box), L-inf ball eps = 8/255 around a [0, 1] input; targets as for PGD (most-/least-
likely class, Pang et al., "On the Security Risks of AutoML", USENIX Security 2022, Sec. 4).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..registry import ATTACKS
from .targets import AttackResult, Case, clean_logits, is_success, model_device, select_targets

ParamSet = Literal["paper", "artifact"]
QUERIES_PER_ESTIMATE = {"paper": 400, "artifact": 100}


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


@ATTACKS.register("nes", threat="black-box (scores)", norm="linf", source="PROTOCOLS 4")
def nes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
        targets: torch.Tensor | None = None, case: Case = "most", eps: float = 8 / 255,
        step: float = 2 / 255, queries_per_estimate: int | None = None,
        max_queries: int = 10_000, sigma: float = 1e-3, params: ParamSet = "paper",
        success_prob: float | None = None, seed: int = 0, batch_size: int = 32,
        forward_batch: int = 4096) -> AttackResult:
    """Targeted NES attack (PROTOCOLS 4 "NES"; Ilyas et al. 2018, Alg. 1 without the
    partial-information part): per step, estimate the gradient of f = -log p_target with
    :func:`nes_gradient`, step ``x <- x - step * sign(g)``, project onto the ``eps``-ball
    and [0, 1], then query once to check success (argmax == target, and target probability
    > ``success_prob`` when set). Each input stops at its first success or when another
    step would exceed ``max_queries``; ``result.queries`` counts every model evaluation
    spent on it (estimates + success checks; the clean query that picks the targets is
    not counted, as the targets are given in the threat model).

    ``targets`` default to the ``case`` rule on the clean output; ``queries_per_estimate``
    defaults to ``params``: ``paper`` 400, ``artifact`` 100.

    Deviations: the protocol gives neither step nor budget: we use step 2/255 (the PGD
    step) and ``max_queries`` 10,000 (Ilyas et al.'s L-inf budget scale).
    """
    if params not in QUERIES_PER_ESTIMATE:
        raise ValueError(f"params must be 'paper' or 'artifact', got {params!r}")
    n = queries_per_estimate or QUERIES_PER_ESTIMATE[params]
    device = model_device(model)
    was_training = model.training
    model.eval()
    if targets is None:
        targets = select_targets(clean_logits(model, x, forward_batch), case)
    gen = torch.Generator(device=device).manual_seed(seed)
    max_steps = max_queries // (n + 1)
    out_x, out_ok, out_q = [], [], []
    try:
        for i in range(0, len(x), batch_size):
            x0 = x[i:i + batch_size].to(device).float()
            tb = targets[i:i + batch_size].to(device)
            yb = y[i:i + batch_size].to(device)
            xa = x0.clone()
            done = torch.zeros(len(x0), dtype=torch.bool, device=device)
            queries = torch.zeros(len(x0), dtype=torch.long, device=device)
            lo, hi = (x0 - eps).clamp(min=0), (x0 + eps).clamp(max=1)
            for _ in range(max_steps):
                act = torch.nonzero(~done).flatten()
                if len(act) == 0:
                    break
                g = nes_gradient(model, xa[act], tb[act], queries=n, sigma=sigma,
                                 generator=gen, forward_batch=forward_batch)
                new = xa[act] - step * g.sign()
                xa[act] = torch.minimum(torch.maximum(new, lo[act]), hi[act])
                with torch.no_grad():
                    ok = is_success(model(xa[act]), yb[act], targets=tb[act],
                                    success_prob=success_prob)
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
