"""Data poisoning (label flipping; later NAS poisons)."""
