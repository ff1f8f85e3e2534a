"""Attacks, one module each; importing this package registers them in ATTACKS."""
