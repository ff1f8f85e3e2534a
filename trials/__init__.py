"""Plain PyTorch: data, models, training, attacks, metrics, trial kinds. Never imports Ray or
MLflow (``nasrisk.study`` wraps trials). Importing this package registers every entry."""

from . import attacks, backdoor, data, kinds, metrics, models, poison  # noqa: F401  (register)
from .registry import ATTACKS, DATASETS, METRICS, MODELS, TRIAL_KINDS, Registry

__all__ = ["ATTACKS", "DATASETS", "METRICS", "MODELS", "TRIAL_KINDS", "Registry"]
