"""What the evasion attacks of PROTOCOLS 4 share: the inputs they attack, the target classes,
the success criterion and the result type.

* Inputs: ``n`` *correctly classified* random test inputs (PROTOCOLS 4, PGD targeted).
* Targets (Pang et al., "On the Security Risks of AutoML", USENIX Security 2022, Sec. 4):
  most-likely case = the 2nd most likely class of the clean input; least-likely case = the
  least likely class.
* Success: the model's argmax is the target (targeted) or differs from the true label
  (untargeted); the ``artifact`` parameter set also requires the target's probability to
  exceed a threshold (0.99). An input succeeds when *any* iterate within the maximum number
  of iterations meets the criterion (Pang et al. 2022, Sec. 3.2: "classified as its target
  class within maximum iterations"); the attack keeps it at its first successful iterate.
* Queries: ``AttackResult.queries`` counts the model evaluations spent on each input, the
  clean query included (each attack's docstring gives its exact count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..data.base import to_float
from ..train import predict_logits

Case = Literal["most", "least"]


@dataclass(frozen=True)
class AttackResult:
    """The outcome of an evasion attack on a batch (all tensors on CPU).

    ``x_adv`` the adversarial inputs in [0, 1] (a successful input at its first successful
    iterate); ``success`` one bool per input; ``asr`` the attack success rate (mean of
    ``success``); ``queries`` model evaluations spent per input, the clean query included
    (int64; None where an attack does not count them); ``targets`` the target classes
    (targeted attacks).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    asr: float
    queries: torch.Tensor | None = None
    targets: torch.Tensor | None = None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameter-free model)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def clean_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Eval-mode float32 logits on CPU of [0, 1] inputs (the model's mode is restored)."""
    return predict_logits(model, x, device=model_device(model), batch_size=batch_size)


def select_targets(logits: torch.Tensor, case: Case = "most") -> torch.Tensor:
    """Target classes from clean logits ``(B, K)``: ``"most"`` = the 2nd most likely class,
    ``"least"`` = the least likely class (Pang et al. 2022, Sec. 4, evasion)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, K>=2), got {tuple(logits.shape)}")
    if case == "most":
        return logits.topk(2, dim=1).indices[:, 1]
    if case == "least":
        return logits.argmin(dim=1)
    raise ValueError(f"case must be 'most' or 'least', got {case!r}")


def is_success(logits: torch.Tensor, y: torch.Tensor, *, targets: torch.Tensor | None = None,
               success_prob: float | None = None) -> torch.Tensor:
    """Per-input success: argmax == target (targeted, ``targets`` given) or != ``y``
    (untargeted); with ``success_prob``, the target's (untargeted: the predicted class's)
    softmax probability must also exceed it (the ``artifact`` criterion)."""
    pred = logits.argmax(1)
    ok = pred == targets if targets is not None else pred != y
    if success_prob is not None:
        cls = targets if targets is not None else pred
        p = logits.float().softmax(1).gather(1, cls[:, None])[:, 0]
        ok = ok & (p > success_prob)
    return ok


def select_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int, seed: int, *,
                   device: torch.device | str | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` random inputs of ``(x, y)`` that ``model`` classifies correctly, chosen by ``seed``.

    Returns ``(x_sel, y_sel, idx)``: ``x_sel`` float in [0, 1] (uint8 input is scaled),
    ``idx`` their positions in ``x``. Fewer than ``n`` are returned when fewer are correct.
    """
    if device is None:
        device = model_device(model)
    pred = predict_logits(model, x, device=device).argmax(1)
    correct = torch.nonzero(pred == y.cpu()).flatten()
    gen = torch.Generator().manual_seed(seed)
    idx = correct[torch.randperm(len(correct), generator=gen)[:n]].sort().values
    xs = x[idx]
    xs = to_float(xs) if xs.dtype == torch.uint8 else xs.float()
    return xs, y[idx].cpu(), idx
