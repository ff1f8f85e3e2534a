"""A score cache keyed by (isomorphism class of the arch, scoring config) (PROTOCOLS 5,
issue 9: "an arch revisited costs nothing").

Two isomorphic NATS archs compute the same function (NAS-Bench-201's
:func:`~..models.nats.arch_string.isomorphism_key`), so their kappa is one value; the scoring
config (dataset, sizes, batch, seed, BN mode, variant, ...) as canonical JSON is the other half
of the key, so a changed config never reads a stale score. The cache's state (entries and
hit/miss counts) is plain dicts and numbers, saved in the search's checkpoint so it survives a
resume.

Deviations: isomorphic archs share one score although their *initialisation* differs (the
reference scored each string's own seeded init); the kappa of an isomorphism class under one
seed is what the search needs, and it makes revisits free.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from ..models.nats.arch_string import isomorphism_key


def config_key(config: Mapping[str, Any]) -> str:
    """The canonical JSON of a scoring config (sorted keys, no spaces)."""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=str)


class ScoreCache:
    """``(isomorphism_key(arch), config_key(config)) -> score``, with hit and miss counts."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        state = state or {}
        self.entries: dict[str, dict[str, float]] = {
            c: dict(v) for c, v in state.get("entries", {}).items()}
        self.hits = int(state.get("hits", 0))
        self.misses = int(state.get("misses", 0))

    def get(self, arch: str, config: Mapping[str, Any]) -> float | None:
        return self.entries.get(config_key(config), {}).get(isomorphism_key(arch))

    def put(self, arch: str, config: Mapping[str, Any], value: float) -> None:
        self.entries.setdefault(config_key(config), {})[isomorphism_key(arch)] = float(value)

    def cached(self, score: Callable[[str], float],
               config: Mapping[str, Any]) -> Callable[[str], float]:
        """``score`` through the cache under ``config`` (counts a hit or a miss per call)."""
        ckey = config_key(config)

        def scored(arch: str) -> float:
            table = self.entries.setdefault(ckey, {})
            key = isomorphism_key(arch)
            if key in table:
                self.hits += 1
                return table[key]
            value = float(score(arch))
            table[key] = value
            self.misses += 1
            return value

        return scored

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def state(self) -> dict[str, Any]:
        """What :class:`ScoreCache` (state) rebuilds it from."""
        return {"entries": {c: dict(v) for c, v in self.entries.items()},
                "hits": self.hits, "misses": self.misses}
