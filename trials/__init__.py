"""Plain PyTorch: data, models, training, attacks, metrics, trial kinds. Never imports Ray or
MLflow (``nasrisk.study`` wraps trials). Importing this package is cheap (no torch): each
registry imports the subpackages that fill it on its first lookup
(:class:`~nasrisk.trials.registry.Registry`); :func:`load_all` imports every one now."""

from .registry import (
    ATTACKS,
    DATASETS,
    DEFENSES,
    METRICS,
    MODELS,
    STEP_KINDS,
    TRIAL_KINDS,
    Registry,
)

__all__ = ["ATTACKS", "DATASETS", "DEFENSES", "METRICS", "MODELS", "STEP_KINDS", "TRIAL_KINDS",
           "Registry", "load_all"]


def load_all() -> None:
    """Register every entry of every registry now (a Ray worker does, before unpickling)."""
    for reg in (MODELS, DATASETS, ATTACKS, METRICS, TRIAL_KINDS, STEP_KINDS, DEFENSES):
        reg.names()
