"""EVAS's search (Pang et al., "The Dark Side of AutoML: Towards Architectural Backdoor
Search", ICLR 2023, Sec. 4 / Alg. 1; PROTOCOLS 5 "Search (regularised evolution)"):
regularised evolution (Real et al., AAAI 2019) over the NATS-Bench topology space on a score
to minimise (kappa), and a random-search baseline with the same number of score evaluations.

A search is a pure, resumable state machine: :class:`SearchState` holds everything (pool,
ages, full history, the RNG's state, the iteration counter) as plain lists and numbers, so
``SearchState.from_dict(state.to_dict())`` continues exactly where it was and a search
killed after any step and resumed gives the identical history. The score is injected
(``score(arch) -> float``), so tests use a synthetic one and the trial kind a cached kappa.

Evolution. Draw ``pool_size`` distinct archs from all 15,625 (seeded ``random.Random``) and
score them; then each iteration: sample ``sample_size`` distinct pool members, take the one
with the lowest score, mutate it on one edge (:func:`~..models.nats.arch_string.mutate`:
op weights none 1, skip 2, conv1x1 3, conv3x3 3, avg_pool 1, never the same op), score the
child, append it to the pool and drop the pool's oldest member. Random search starts from the
same initial pool (same seed: the same first ``pool_size`` archs) and each iteration scores a
uniformly drawn arch instead of a mutation; it keeps the latest ``pool_size`` scored archs as
its "pool" (same ageing), so both report a final-pool median.

Scores. A non-finite or negative score (a flagged kappa is +inf; a condition number is >= 1,
so a negative or NaN one is a broken score) ranks last (:func:`rank_value`), never first.

Deviations (bugs of the reference search that are fixed here): (1) the reference took the
best member's position *inside the sample* and indexed the *pool* with it, so the parent was
usually not the sample's best; here the sample is a list of pool indices and the parent is
the pool member at the winning index. (2) The reference mapped NaN kappa to 1e5 and let a
negative lambda_min give a negative kappa, which its ``min`` then preferred; here both rank
last. (3) The reference seeded from the clock; here every draw comes from one
``random.Random(seed)`` whose state is checkpointed, so a search is reproducible and resumable.
Ties among equal scores go to the earlier sampled member (evolution) or evaluation (best seen).
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import UserError
from ..models.nats.arch_string import all_archs, mutate

Method = Literal["evolution", "random"]
METHODS: tuple[str, ...] = ("evolution", "random")
Score = Callable[[str], float]


@functools.cache
def _all_archs() -> tuple[str, ...]:
    return tuple(all_archs())


@functools.cache
def _arch_index() -> dict[str, int]:
    return {a: i for i, a in enumerate(_all_archs())}


def arch_of(index: int) -> str:
    """The arch string of an index into :func:`~..models.nats.arch_string.all_archs`."""
    return _all_archs()[index]


def index_of(arch: str) -> int:
    return _arch_index()[arch]


def rank_value(score: float) -> float:
    """The value a search ranks ``score`` by: itself when finite and >= 0, else +inf (last)."""
    s = float(score)
    return s if math.isfinite(s) and s >= 0 else math.inf


def _rng_state_to_lists(state: tuple) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_lists(state: list[Any]) -> tuple:
    version, internal, gauss = state
    return (int(version), tuple(int(v) for v in internal), gauss)


@dataclass
class SearchState:
    """Everything a search is (see the module docstring); archs are indices into
    ``all_archs()`` to keep the checkpoint small. ``pool``/``pool_scores``/``born`` are in
    insertion order; ``born`` is the iteration a member entered (0: the initial pool), so its
    age is ``iteration - born``. ``history`` has one entry per score evaluation (initial pool
    first, at iteration 0), ``best`` the best rank value seen up to and including it."""

    method: str
    pool_size: int
    sample_size: int
    iterations: int
    seed: int
    rng: list[Any]
    initial: list[int]
    iteration: int = 0
    pool: list[int] = field(default_factory=list)
    pool_scores: list[float] = field(default_factory=list)
    born: list[int] = field(default_factory=list)
    hist_iteration: list[int] = field(default_factory=list)
    hist_arch: list[int] = field(default_factory=list)
    hist_score: list[float] = field(default_factory=list)
    hist_best: list[float] = field(default_factory=list)

    # -- (de)serialisation: plain lists, ints, floats (torch.load(weights_only=True)-safe) --
    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchState:
        return cls(**{k: (list(v) if isinstance(v, list) else v) for k, v in d.items()})

    # -- progress ------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return len(self.pool) >= self.pool_size and self.iteration >= self.iterations

    @property
    def evaluations(self) -> int:
        return len(self.hist_score)

    @property
    def best(self) -> float:
        return self.hist_best[-1] if self.hist_best else math.inf

    def ages(self) -> list[int]:
        return [self.iteration - b for b in self.born]


def init_search(method: str, *, pool_size: int = 50, sample_size: int = 10,
                iterations: int = 4000, seed: int = 0) -> SearchState:
    """A new search: the initial pool drawn (``pool_size`` distinct archs of all 15,625 under
    ``random.Random(seed)``), nothing scored yet."""
    if method not in METHODS:
        raise UserError(f"unknown search method {method!r}; valid: {', '.join(METHODS)}")
    n = len(_all_archs())
    if not 1 <= pool_size <= n:
        raise UserError(f"pool_size must be in [1, {n}], got {pool_size}")
    if not 1 <= sample_size <= pool_size:
        raise UserError(f"sample_size must be in [1, pool_size={pool_size}], got {sample_size}")
    if iterations < 0:
        raise UserError(f"iterations must be >= 0, got {iterations}")
    rng = random.Random(seed)
    initial = rng.sample(range(n), pool_size)
    return SearchState(method=method, pool_size=pool_size, sample_size=sample_size,
                       iterations=iterations, seed=seed,
                       rng=_rng_state_to_lists(rng.getstate()), initial=initial)


def step(state: SearchState, score: Score) -> SearchState:
    """One score evaluation: the next initial-pool member, else one iteration. The state is
    changed only once ``score`` has returned (an exception leaves it as it was)."""
    if state.done:
        return state
    if len(state.pool) < state.pool_size:
        arch = state.initial[len(state.pool)]
        s = float(score(arch_of(arch)))
        _record(state, arch, s, it=0)
        state.pool.append(arch)
        state.pool_scores.append(s)
        state.born.append(0)
        return state
    rng = random.Random()
    rng.setstate(_rng_state_from_lists(state.rng))
    if state.method == "evolution":
        sample = rng.sample(range(len(state.pool)), state.sample_size)
        # the pool index of the sample's best (ties: the first sampled): not its position
        # inside the sample (the reference's bug)
        parent = min(sample, key=lambda i: rank_value(state.pool_scores[i]))
        child = index_of(mutate(arch_of(state.pool[parent]), rng))
    else:
        child = rng.randrange(len(_all_archs()))
    s = float(score(arch_of(child)))
    it = state.iteration + 1
    _record(state, child, s, it=it)
    oldest = min(range(len(state.born)), key=lambda i: state.born[i])
    for lst in (state.pool, state.pool_scores, state.born):
        del lst[oldest]
    state.pool.append(child)
    state.pool_scores.append(s)
    state.born.append(it)
    state.iteration = it
    state.rng = _rng_state_to_lists(rng.getstate())
    return state


def _record(state: SearchState, arch: int, s: float, *, it: int) -> None:
    state.hist_iteration.append(it)
    state.hist_arch.append(arch)
    state.hist_score.append(s)
    state.hist_best.append(min(state.best, rank_value(s)))


def run_search(state: SearchState, score: Score,
               on_step: Callable[[SearchState], None] | None = None) -> SearchState:
    """Step until done, calling ``on_step(state)`` after each evaluation (checkpoint there)."""
    while not state.done:
        step(state, score)
        if on_step is not None:
            on_step(state)
    return state


# -- results ---------------------------------------------------------------------------------
def finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def best_index(state: SearchState) -> int | None:
    """The history position of the best score seen (lowest rank value, the earliest of
    equals); None before any evaluation."""
    if not state.hist_score:
        return None
    return min(range(len(state.hist_score)), key=lambda i: rank_value(state.hist_score[i]))


def found(state: SearchState) -> dict[str, Any]:
    """The best arch seen: ``{iteration, evaluation, arch, score}`` (score None if flagged)."""
    i = best_index(state)
    if i is None:
        return {}
    return {"iteration": state.hist_iteration[i], "evaluation": i,
            "arch": arch_of(state.hist_arch[i]),
            "score": finite_or_none(rank_value(state.hist_score[i]))}


def trajectory(state: SearchState) -> list[dict[str, Any]]:
    """One row per iteration ``{iteration, arch, score, best_so_far}``: row 0 is the best of
    the initial pool (iteration 0), row i the arch scored at iteration i (the child of
    evolution, the draw of random search). Flagged scores are None."""
    n0 = min(state.pool_size, len(state.hist_score))
    if n0 == 0:
        return []
    b = min(range(n0), key=lambda i: rank_value(state.hist_score[i]))
    rows = [{"iteration": 0, "arch": arch_of(state.hist_arch[b]),
             "score": finite_or_none(rank_value(state.hist_score[b])),
             "best_so_far": finite_or_none(state.hist_best[n0 - 1])}]
    for i in range(n0, len(state.hist_score)):
        rows.append({"iteration": state.hist_iteration[i], "arch": arch_of(state.hist_arch[i]),
                     "score": finite_or_none(rank_value(state.hist_score[i])),
                     "best_so_far": finite_or_none(state.hist_best[i])})
    return rows


def median_score(scores: list[float]) -> float:
    """Median of rank values (+inf counts as the largest); NaN for no scores."""
    return float(statistics.median(rank_value(s) for s in scores)) if scores else math.nan


def initial_pool_median(state: SearchState) -> float:
    return median_score(state.hist_score[:state.pool_size])
