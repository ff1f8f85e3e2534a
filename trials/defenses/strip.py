"""STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks",
ACSAC 2019, Sec. 4-5, Eq. 3-5; EVAS Table 5; PROTOCOLS 5 (e)).

Each test input is superimposed (``alpha * x + (1 - alpha) * x_j``, alpha 0.5) with
``n_superimpose`` clean images ``x_j`` drawn from the defender's held-out clean data, and its
score is the entropy (bits) of the model's softmax averaged over the blends (Gao et al.'s
normalised entropy ``H_sum / N``, Eq. 4-5). A trigger survives the blending and keeps the
prediction on the target, so trigger inputs have low entropy: the AUROC of "trigger" against
"clean" with the negative entropy as the score says how well STRIP tells them apart (1 =
perfectly). ``strip_frr_at_far`` is the false rejection rate of clean inputs at the
threshold that accepts ``far`` (1%) of the trigger inputs (Gao et al. fix the FRR and report
the FAR; the EVAS table reports AUROC).

ART's STRIP (``art.defences.transformer.poisoning.STRIP``, wrapping a ``PyTorchClassifier``) is
not used: it only returns a classifier that abstains below a threshold fitted to the clean
entropies, and exposes no per-input entropy, so no AUROC; it also blends and predicts one
input at a time with the unseeded global NumPy RNG, and its entropy
(``scipy.stats.entropy(preds, axis=0)`` summed over classes) normalises each class's
probabilities over the blends instead of taking each blend's entropy over classes (Eq. 3).
Here the entropies are computed batched, seeded, as the paper defines them.

Metrics: ``strip_auroc``, ``strip_entropy_clean`` / ``strip_entropy_trigger`` (mean entropy),
``strip_frr_at_far``. Without trigger inputs the trial cannot run STRIP (``needs_trigger``).

Deviations: trigger inputs are the patched (or generator-made) versions of the clean test
inputs whose label is not the target (PROTOCOLS 5's ASR population), not a separate set.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..data.base import to_float
from ..registry import DEFENSES
from .entry import DefenseEntry, DefenseInputs


class StripOptions(BaseModel):
    """``n_superimpose`` blends per input (Gao et al.: 100), blend ``alpha``, ``far`` of the
    FRR metric, ``pool`` clean held-out images the blends draw from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_superimpose: int = Field(100, ge=1)
    alpha: float = Field(0.5, gt=0, lt=1)
    far: float = Field(0.01, gt=0, lt=1)
    pool: int = Field(1000, ge=1)


@torch.no_grad()
def strip_entropy(model: nn.Module, x: torch.Tensor, pool: torch.Tensor, *, n: int,
                  alpha: float = 0.5, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Per input of ``x`` (float [0, 1]), the mean over ``n`` blends with random images of
    ``pool`` (float) of the entropy in bits of the softmax (Gao et al. Eq. 3-5)."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(pool), (len(x), n), generator=gen)
    was = model.training
    model.eval()
    try:
        out = torch.empty(len(x), dtype=torch.float64)
        per = max(1, batch_size // n)
        for i in range(0, len(x), per):
            xb = x[i:i + per].to(dev)
            blend = alpha * xb[:, None] + (1 - alpha) * pool[picks[i:i + per]].to(dev)
            p = model(blend.flatten(0, 1)).double().softmax(1)
            h = -(p * p.clamp_min(1e-300).log2()).sum(1)
            out[i:i + per] = h.view(len(xb), n).mean(1).cpu()
    finally:
        model.train(was)
    return out


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(tie) (the Mann-Whitney AUROC)."""
    if len(positive) == 0 or len(negative) == 0:
        return math.nan
    d = positive.double()[:, None] - negative.double()[None, :]
    return float((d > 0).double().mean() + 0.5 * (d == 0).double().mean())


def strip(model: nn.Module, inputs: DefenseInputs, options: StripOptions, ctx: object = None,
          key: str = "defense/strip") -> dict[str, float]:
    """STRIP's entropies of clean and trigger inputs and their AUROC (module docstring)."""
    trig = inputs.triggered()
    if trig is None:
        raise ValueError("STRIP needs trigger inputs (the trial's trigger source gave none)")
    pool = to_float(inputs.defender.x_train[:options.pool])
    kw = dict(n=options.n_superimpose, alpha=options.alpha, batch_size=inputs.batch_size)
    h_clean = strip_entropy(model, inputs.clean(), pool, seed=inputs.seed, **kw)
    h_trig = strip_entropy(model, trig[0], pool, seed=inputs.seed + 1, **kw)
    # accept (call clean) above the threshold: FAR = trigger inputs accepted
    thr = torch.quantile(h_trig, 1 - options.far) if len(h_trig) else torch.tensor(math.nan)
    return {"strip_auroc": auroc(-h_trig, -h_clean),
            "strip_entropy_clean": float(h_clean.mean()),
            "strip_entropy_trigger": float(h_trig.mean()) if len(h_trig) else math.nan,
            "strip_frr_at_far": float((h_clean <= thr).double().mean())}


DEFENSES.register("strip", DefenseEntry(
    run=strip, options=StripOptions,
    metrics=("strip_auroc", "strip_entropy_clean", "strip_entropy_trigger", "strip_frr_at_far"),
    source="Gao et al., ACSAC 2019, Eq. 3-5 (EVAS Table 5)", needs_trigger=True,
    uses_art="no (its STRIP gives no per-input entropies; see the module docstring)",
    description="entropy of superimposed inputs; AUROC trigger vs clean"))
