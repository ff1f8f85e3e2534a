"""Models: NATS-Bench cells, DARTS genotypes, manual CIFAR models, the trigger generator."""

from . import (
    darts,  # noqa: F401
    generator,  # noqa: F401
    manual,  # noqa: F401
    nats,  # noqa: F401
    wrapper,  # noqa: F401
)
