"""NeuralCleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019, Sec. IV; EVAS Table 4; PROTOCOLS 5 (e)).

For every class ``k`` it reverse-engineers the smallest trigger that sends clean inputs to
``k`` (Eq. 2-3): a mask ``m_k`` (one channel, ``H x W``) and a pattern ``p_k`` (``3 x H x W``),
both in tanh space (``m = tanh(w) / 2 + 1/2``), the trigger input
``x' = (1 - m_k) * x + m_k * p_k``, minimising ``CE(f(x'), k) + lambda_k * |m_k|_1`` with Adam
(lr 0.1, betas (0.5, 0.9), the paper's) on batches of the defender's clean inputs. A backdoor
target needs a much smaller mask than the other classes: the MAD outlier test (Sec. IV-A)
gives each class the anomaly index ``|L_k - median(L)| / (1.4826 * MAD(L))`` of its mask's
L1 norm ``L_k``, and the model is flagged when the smallest-norm class (below the median) has
an index above 2.

Written here because ART's ``NeuralCleanse`` (``art.defences.transformer.poisoning``) wraps only
``KerasClassifier`` (its ``KerasNeuralCleanse`` is TensorFlow code): our models are PyTorch.
All classes are optimised at once (one batch of ``classes x inputs``; the parameters of two
classes never meet, and Adam is per-element, so this equals one run per class).

Metrics: ``nc_anomaly_index`` (of the backdoor's target class when the trial knows it, else of
the smallest-norm class), ``nc_flagged`` (1/0), ``nc_flagged_class`` (the smallest-norm class
if flagged, else -1), ``nc_target_norm`` (the L1 norm of that class's mask, pixels) and
``nc_median_norm``.

Deviations: the paper's cost schedule (lambda 0 until the attack succeeds, then ``init_cost``,
raised by 1.5x after ``patience`` epochs of success and lowered by 1.5^1.5 after ``patience``
epochs without, with early stopping) is simplified to: every ``patience`` steps each class's
lambda is multiplied by ``cost_multiplier`` when its success rate reached
``attack_threshold`` on every batch since the last update and divided by
``cost_multiplier ** 1.5`` otherwise, for a fixed number of ``steps``; a class's norm is
that of the smallest mask that reached the threshold on a batch (the last mask when none
did). The optimisation runs on ``n_inputs`` of the defender's
clean training images (the paper: its clean validation set).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data.base import to_float
from ..registry import DEFENSES
from .entry import DefenseEntry, DefenseInputs

#: MAD -> standard deviation of a normal distribution (Wang et al. 2019, Sec. IV-A)
CONSISTENCY = 1.4826


class NeuralCleanseOptions(BaseModel):
    """See the module docstring; ``threshold`` is the anomaly index above which a class is an
    outlier (2, the paper's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(500, ge=1)
    batch_size: int = Field(32, ge=1)
    n_inputs: int = Field(512, ge=1)
    lr: float = Field(0.1, gt=0)
    init_cost: float = Field(1e-3, ge=0)
    cost_multiplier: float = Field(1.5, gt=1)
    patience: int = Field(10, ge=1)
    attack_threshold: float = Field(0.99, gt=0, le=1)
    threshold: float = Field(2.0, gt=0)


def anomaly_indices(norms: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(|L - median| / (1.4826 * MAD), median)`` of the per-class norms ``L`` (float64)."""
    n = norms.double()
    med = n.median()
    mad = CONSISTENCY * (n - med).abs().median()
    return (n - med).abs() / mad.clamp_min(1e-12), float(med)


def reverse_engineer(model: nn.Module, x: torch.Tensor, num_classes: int,
                     opts: NeuralCleanseOptions, *, seed: int = 0) -> torch.Tensor:
    """The L1 norm of each class's reverse-engineered mask (``(num_classes,)``, pixels) on the
    clean float inputs ``x``: Wang et al. Eq. 3 with the schedule of the module docstring."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    k, (c, h, w) = num_classes, x.shape[1:]
    w_mask = (0.1 * torch.randn(k, 1, h, w, generator=gen)).to(dev).requires_grad_()
    w_pat = (0.1 * torch.randn(k, c, h, w, generator=gen)).to(dev).requires_grad_()
    opt = torch.optim.Adam([w_mask, w_pat], lr=opts.lr, betas=(0.5, 0.9))
    cost = torch.full((k,), opts.init_cost, device=dev)
    best = torch.full((k,), float("inf"), device=dev)
    targets = torch.arange(k, device=dev)
    was = model.training
    grads = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        hits = torch.zeros(k, device=dev)
        seen = 0
        for step in range(opts.steps):
            idx = torch.randint(0, len(x), (opts.batch_size,), generator=gen)
            xb = x[idx].to(dev)
            mask = torch.tanh(w_mask) / 2 + 0.5
            pat = torch.tanh(w_pat) / 2 + 0.5
            xt = (1 - mask[:, None]) * xb[None] + (mask * pat)[:, None]  # (K, B, C, H, W)
            out = model(xt.flatten(0, 1)).float().view(k, len(idx), -1)
            ce = F.cross_entropy(out.flatten(0, 1), targets.repeat_interleave(len(idx)),
                                 reduction="none").view(k, -1).mean(1)
            l1 = mask.flatten(1).sum(1)
            opt.zero_grad(set_to_none=True)
            (ce + cost * l1).sum().backward()
            opt.step()
            with torch.no_grad():
                rate = (out.argmax(2) == targets[:, None]).float().mean(1)
                ok = rate >= opts.attack_threshold
                best = torch.where(ok & (l1 < best), l1.detach(), best)
                hits += ok.float()
                seen += 1
                if (step + 1) % opts.patience == 0:
                    up = hits >= seen  # succeeded on every batch since the last update
                    cost = torch.where(up, cost * opts.cost_multiplier,
                                       cost / opts.cost_multiplier ** 1.5)
                    hits.zero_()
                    seen = 0
        with torch.no_grad():
            last = (torch.tanh(w_mask) / 2 + 0.5).flatten(1).sum(1)
        return torch.where(torch.isfinite(best), best, last).detach().cpu()
    finally:
        for p, g in zip(model.parameters(), grads, strict=True):
            p.requires_grad_(g)
        model.train(was)


def neural_cleanse(model: nn.Module, inputs: DefenseInputs, options: NeuralCleanseOptions,
                   ctx: object = None, key: str = "defense/neural_cleanse") -> dict[str, float]:
    """NeuralCleanse's outlier test on ``model`` (module docstring)."""
    x = to_float(inputs.defender.x_train[:options.n_inputs])
    norms = reverse_engineer(model, x, inputs.num_classes, options, seed=inputs.seed)
    index, med = anomaly_indices(norms)
    smallest = int(norms.argmin())
    flagged = bool(index[smallest] > options.threshold and norms[smallest] < med)
    cls = smallest if inputs.target is None else inputs.target
    return {"nc_anomaly_index": float(index[cls]), "nc_flagged": float(flagged),
            "nc_flagged_class": float(smallest if flagged else -1),
            "nc_target_norm": float(norms[cls]), "nc_median_norm": med}


DEFENSES.register("neural_cleanse", DefenseEntry(
    run=neural_cleanse, options=NeuralCleanseOptions,
    metrics=("nc_anomaly_index", "nc_flagged", "nc_flagged_class", "nc_target_norm",
             "nc_median_norm"),
    source="Wang et al., IEEE S&P 2019, Sec. IV (EVAS Table 4)",
    description="per-class reverse-engineered trigger; MAD anomaly index of the mask norms"))
