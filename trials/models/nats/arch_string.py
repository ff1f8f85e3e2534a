"""NATS-Bench arch strings (PROTOCOLS 1.1). The code lives in :mod:`nasrisk.trials.nats_space`,
which imports no torch (so `nasrisk studies` and plan-time checks can parse arch strings);
this module keeps the import path the models and tests use."""

from ...nats_space import (  # noqa: F401
    EDGES,
    MUTATION_WEIGHTS,
    NUM_NODES,
    OPS,
    ArchStringError,
    all_archs,
    format_arch,
    isomorphism_key,
    mutate,
    op_counts,
    parse_arch,
    sample_archs,
    unique_archs,
)
