"""Backdoor attacks (the EVAS input-aware trigger generator, later TrojanNN/BadNet)."""

from . import input_aware  # noqa: F401
