"""kappa, the NTK condition number that EVAS searches on (Pang et al., "The Dark Side of
AutoML: Towards Architectural Backdoor Search", ICLR 2023, Eq. 6; PROTOCOLS 5 "Score kappa"),
and the TE-NAS condition number (Chen et al., ICLR 2021) as an extra metric.

Registered in METRICS (a :class:`~.entry.MetricEntry` each): ``"kappa"`` -> :func:`kappa_scores`,
``"te_nas"`` -> :func:`te_nas_score`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import UserError
from ..registry import METRICS
from .entry import MetricEntry
from .ntk_kernel import (
    BNMode,
    Composed,
    ParamFilter,
    ParamSet,
    arch_weight_names,
    logit_kernel,
    sample_kernel,
    select_params,
)

VARIANTS: tuple[str, ...] = ("generator", "arch", "bare")


@dataclass(frozen=True)
class KappaResult:
    """A condition number ``kappa = lambda_max / lambda_min`` of a symmetric PSD kernel.
    ``flagged``: lambda_min was non-positive (within float64 round-off) or not finite, and
    ``kappa`` is then ``+inf``. ``eigenvalues`` ascending."""

    kappa: float
    lambda_min: float
    lambda_max: float
    flagged: bool
    eigenvalues: tuple[float, ...]


def condition_number(kernel: torch.Tensor) -> KappaResult:
    """``lambda_max / lambda_min`` of a symmetric kernel by ``eigvalsh`` in the kernel's dtype.

    A rank-deficient PSD kernel has lambda_min = 0 only up to round-off (either sign), so
    lambda_min <= size * eps * lambda_max counts as non-positive and is flagged (kappa = +inf).

    Deviations: the reference mapped NaN to 1e5 and let a negative lambda_min give a negative
    kappa that the search preferred; here both are flagged and scored +inf (PROTOCOLS 5).
    """
    if not torch.isfinite(kernel).all():
        nan = float("nan")
        return KappaResult(math.inf, nan, nan, True, (nan,) * kernel.shape[0])
    eig = torch.linalg.eigvalsh(kernel)
    lo, hi = float(eig[0]), float(eig[-1])
    tol = kernel.shape[0] * torch.finfo(kernel.dtype).eps * max(abs(hi), abs(lo))
    flagged = not (math.isfinite(lo) and math.isfinite(hi)) or lo <= tol
    return KappaResult(math.inf if flagged else hi / lo, lo, hi, flagged, tuple(eig.tolist()))


def kappa(
    classifier: nn.Module,
    x: torch.Tensor,
    *,
    generator: nn.Module | None = None,
    params: ParamSet = "generator",
    bn_mode: BNMode = "eval",
    param_filter: ParamFilter | None = None,
    kernel_dtype: torch.dtype = torch.float64,
    chunk_size: int | None = None,
) -> KappaResult:
    """kappa of ``classifier(generator(x))`` (or ``classifier(x)``) on the scoring batch ``x``
    (PROTOCOLS 5; EVAS Eq. 6): ``K = mean_n J_n J_n^T`` (C x C), ``J_n`` the Jacobian of the C
    logits of sample n w.r.t. a parameter set; ``kappa = lambda_max(K) / lambda_min(K)``.

    ``params``: ``"generator"`` (the generator's parameters, Eq. 6), ``"arch"`` (the
    classifier's parameters whose name contains ``weight``: conv weights, BN gammas, linear
    weights, no biases, as the reference scored), ``"all"``. ``param_filter(name, tensor) ->
    bool`` narrows the set further (names prefixed ``generator.`` / ``classifier.``).
    ``bn_mode`` (PROTOCOLS 5 "BatchNorm while scoring"): ``"eval"`` (default; every BatchNorm on
    its running statistics, which at a fresh init are mean 0 / variance 1: the reference's scoring
    behind EVAS's kappa-vs-ASR figure), ``"coupled"`` (the reference's search script: the
    classifier's BatchNorm in train mode, Jacobians through the batch statistics; the generator in
    eval mode), ``"fixed-stats"`` (every BatchNorm on the batch's statistics, held fixed). The
    kernel is accumulated and decomposed (``eigvalsh``) in ``kernel_dtype`` (float64); the
    modules and their BN running statistics are not modified.

    Why logits: Eq. 5 writes the NTK of the network's probability output. Softmax
    probabilities sum to 1 for every input and every parameter value, so ``1^T p = 1`` and
    ``1^T J_n = 0`` for every sample: ``K 1 = 0``, the C x C kernel of probabilities is always
    singular (lambda_min = 0, kappa infinite for every arch), and it cannot rank archs. The
    reference, too, differentiated the logits.

    Deviations: the logits are differentiated, not the probability vector of Eq. 5 (above);
    only BatchNorm layers change mode while scoring (dropout stays off, so the score is
    deterministic; the NATS nets and the generator have no dropout); a non-positive lambda_min
    is flagged as +inf (:func:`condition_number`).
    """
    composed = Composed(classifier, generator)
    names = select_params(composed, params, param_filter)
    kernel = logit_kernel(
        composed, x, names, bn_mode=bn_mode, kernel_dtype=kernel_dtype, chunk_size=chunk_size
    )
    return condition_number(kernel)


def _seeded(build: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(device)


def kappa_scores(
    build_classifier: Callable[[], nn.Module],
    x: torch.Tensor,
    *,
    build_generator: Callable[[], nn.Module] | None = None,
    variants: Sequence[str] = VARIANTS,
    n_init: int = 3,
    seed: int = 0,
    bn_mode: BNMode = "eval",
) -> dict[str, float]:
    """Median kappa over ``n_init`` re-initialisations (PROTOCOLS 5, "Score kappa").

    Initialisation i builds the classifier and then the generator with PyTorch's default init
    under seed ``seed + i`` (the caller's RNG state is left untouched). Variants: ``generator``
    (Eq. 6), ``arch`` (the classifier's weights, with the generator), ``bare`` (the classifier's
    weights, no generator). ``bn_mode`` as :func:`kappa` (default ``eval``: on fresh modules,
    running statistics mean 0 / variance 1, the reference's scoring). Returns ``kappa_<variant>`` (median; +inf counts as largest) and
    ``kappa_<variant>_flagged`` (fraction of initialisations flagged).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown kappa variants {unknown}; valid: {', '.join(VARIANTS)}")
    if build_generator is None and any(v in ("generator", "arch") for v in variants):
        raise UserError("kappa variants 'generator' and 'arch' need build_generator")
    if n_init < 1:
        raise UserError(f"n_init must be >= 1, got {n_init}")
    runs: dict[str, list[KappaResult]] = {v: [] for v in variants}
    for i in range(n_init):
        classifier = _seeded(build_classifier, seed + i, x.device)
        generator = _seeded(build_generator, seed + i, x.device) if build_generator else None
        for v in variants:
            gen = None if v == "bare" else generator
            ps = "generator" if v == "generator" else "arch"
            runs[v].append(kappa(classifier, x, generator=gen, params=ps, bn_mode=bn_mode))
    out: dict[str, float] = {}
    for v, results in runs.items():
        out[f"kappa_{v}"] = float(statistics.median(r.kappa for r in results))
        out[f"kappa_{v}_flagged"] = sum(r.flagged for r in results) / len(results)
    return out


def te_nas_score(
    classifier: nn.Module,
    x: torch.Tensor,
    *,
    bn_mode: BNMode = "coupled",
    param_filter: ParamFilter | None = None,
) -> float:
    """The TE-NAS NTK condition number (Chen, Gong, Wang, "Neural Architecture Search on
    ImageNet in Four GPU Hours", ICLR 2021, Sec. 3.1.1): the N x N kernel of per-sample
    gradients of the summed logits w.r.t. all parameters, ``lambda_max / lambda_min`` in float64;
    +inf when lambda_min is non-positive or not finite.

    ``bn_mode`` defaults to ``coupled``, the TE-NAS code's train-mode batch semantics.

    Deviations: one batch, one initialisation (TE-NAS averages repeats: call it per seed);
    dropout off while scoring (as :func:`kappa`); a flagged kernel scores +inf, not NaN.
    """
    composed = Composed(classifier)
    names = select_params(composed, "all", param_filter)
    return condition_number(sample_kernel(composed, x, names, bn_mode=bn_mode)).kappa


class KappaConfig(BaseModel):
    """:func:`kappa_scores`'s options (its defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variants: tuple[Literal["generator", "arch", "bare"], ...] = VARIANTS
    n_init: int = Field(3, ge=1)
    seed: int = 0
    bn_mode: BNMode = "eval"


class TeNasConfig(BaseModel):
    """:func:`te_nas_score`'s options (its defaults; ``param_filter`` is code, not config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bn_mode: BNMode = "coupled"


def _kappa_names(cfg: KappaConfig) -> tuple[str, ...]:
    return tuple(n for v in cfg.variants for n in (f"kappa_{v}", f"kappa_{v}_flagged"))


METRICS.register("kappa", MetricEntry(
    fn=kappa_scores, config=KappaConfig, takes=("build_classifier", "x", "build_generator"),
    metrics=_kappa_names(KappaConfig()), metrics_for=_kappa_names,
    source="EVAS (Pang et al., ICLR 2023) Eq. 6; PROTOCOLS 5"))
METRICS.register("te_nas", MetricEntry(
    fn=te_nas_score, config=TeNasConfig, takes=("classifier", "x"), metrics=("te_nas",),
    source="TE-NAS (Chen et al., ICLR 2021), Sec. 3.1.1"))

__all__ = [
    "KappaResult",
    "arch_weight_names",
    "condition_number",
    "kappa",
    "kappa_scores",
    "te_nas_score",
]
