"""Models: NATS-Bench cells, DARTS genotypes, manual CIFAR models, the trigger generator."""

from . import wrapper  # noqa: F401

