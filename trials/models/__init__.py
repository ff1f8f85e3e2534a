"""Models: NATS-Bench cells, DARTS genotypes, manual CIFAR models, the trigger generator."""

from . import wrapper  # noqa: F401

from . import darts  # noqa: F401
from . import manual  # noqa: F401
from . import generator  # noqa: F401
from . import nats  # noqa: F401
