"""Data poisoning (label flipping; later NAS poisons)."""

from . import label_flip  # noqa: F401  (register)
