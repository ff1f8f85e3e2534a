"""Attacks, one module each; importing this package imports every module in it, which
registers the module's attacks in ATTACKS (so a new attack is one module holding its
registration, and nothing else to edit)."""

import importlib
import pkgutil

from .entry import AttackCommon, AttackEntry, AttackInputs
from .targets import AttackResult, select_correct, select_targets

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["AttackCommon", "AttackEntry", "AttackInputs", "AttackResult", "select_correct",
           "select_targets"]
