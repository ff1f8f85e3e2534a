"""NATS-Bench topology space (NAS-Bench-201): arch strings, isomorphism, sampling, mutation,
and the TinyNetwork that trains one arch (PROTOCOLS 1.1). Importing registers ``MODELS["nats"]``."""

from .arch_string import (
    EDGES,
    MUTATION_WEIGHTS,
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
from .network import TinyNetwork, build_nats

__all__ = [
    "EDGES", "MUTATION_WEIGHTS", "OPS", "ArchStringError", "TinyNetwork", "all_archs",
    "build_nats", "format_arch", "isomorphism_key", "mutate", "op_counts", "parse_arch",
    "sample_archs", "unique_archs",
]
