"""Measurements of a model (kappa, gradient variance, loss contours, ...)."""

from . import contours, grad_var  # noqa: F401  (register)
from . import ntk  # noqa: F401  (register)
