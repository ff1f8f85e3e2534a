"""Measurements of a model (kappa, gradient variance, loss contours, ...). Importing this
package imports every module in it, which registers the module's metrics in METRICS as
:class:`~.entry.MetricEntry` (a new metric is one module holding its registration)."""

import importlib
import pkgutil

from .entry import MetricEntry

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["MetricEntry"]
