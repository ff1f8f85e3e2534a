"""Measurements of a model (kappa, gradient variance, loss contours, ...)."""
