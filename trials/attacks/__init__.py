"""Attacks, one module each; importing this package registers them in ATTACKS."""

from . import nes, pgd, targets  # noqa: F401  (register)
from .targets import AttackResult, select_correct, select_targets

__all__ = ["AttackResult", "select_correct", "select_targets"]
