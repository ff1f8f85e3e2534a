"""Lineage step kinds (registered in ``STEP_KINDS``): each module holds one step's typed
config and the function that makes a child model from its parent (:mod:`nasrisk.trials.lineage`)."""

from . import badnet, fine_tune, label_flip, trigger_mix  # noqa: F401  (register)
