"""Measurements of a model (kappa, gradient variance, loss contours, ...)."""

from . import contours, grad_var, ntk  # noqa: F401  (register)
