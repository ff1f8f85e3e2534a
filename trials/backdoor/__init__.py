"""Backdoor attacks (the EVAS input-aware trigger generator, later TrojanNN/BadNet)."""
