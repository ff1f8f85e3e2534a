"""EVAS's regularised evolution and its random baseline as a pure state machine
(trials/searches/evolution.py), the score cache, and the evas_search kind's resume, on
synthetic scores (no kappa: milliseconds per search)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from nasrisk.trials.context import LocalContext
from nasrisk.trials.kinds.evas_search import EvasSearchConfig, run_search_trial
from nasrisk.trials.models.nats.arch_string import (
    MUTATION_WEIGHTS,
    OPS,
    all_archs,
    format_arch,
    isomorphism_key,
    mutate,
    parse_arch,
    sample_archs,
)
from nasrisk.trials.searches import evolution as evo
from nasrisk.trials.searches.cache import ScoreCache

TARGET = parse_arch(sample_archs(1, seed=123)[0])


def distance(arch: str) -> float:
    """1 + Hamming distance of the ops to TARGET: a condition-number-like score (>= 1) whose
    one minimum (1.0) is TARGET."""
    return 1.0 + sum(a != b for a, b in zip(parse_arch(arch), TARGET, strict=True))


def hamming(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(parse_arch(a), parse_arch(b), strict=True))


def search(method, score=distance, **kw):
    kw = {"pool_size": 20, "sample_size": 5, "iterations": 400, "seed": 0, **kw}
    return evo.run_search(evo.init_search(method, **kw), score)


def test_evolution_finds_the_known_minimum_random_search_does_not():
    # measured, seeds 0..19 (pool 20, sample 5, 400 iterations = 420 evaluations):
    # evolution found TARGET in 19/20 (first at iterations 26..319), random in 1/20
    # (a draw hits one string with p = 1/15,625)
    found = {m: [evo.found(search(m, seed=s))["score"] == 1.0 for s in range(10)]
             for m in evo.METHODS}
    assert sum(found["evolution"]) >= 8, found
    assert sum(found["random"]) <= 2, found
    # the same budget: both made pool_size + iterations score evaluations
    assert search("evolution").evaluations == search("random").evaluations == 420


def test_mutation_changes_one_edge_never_to_the_same_op_with_the_reference_weights():
    rng = random.Random(0)
    arch = format_arch(["none"] * 6)
    new_ops = Counter()
    for a in sample_archs(50, seed=1):
        for _ in range(40):
            child = mutate(a, rng)
            assert child != a and hamming(child, a) == 1
    for _ in range(20_000):
        child = mutate(arch, rng)
        (op,) = [o for o in parse_arch(child) if o != "none"]
        new_ops[op] += 1
    weights = {op: MUTATION_WEIGHTS[op] for op in OPS if op != "none"}
    total = sum(weights.values())
    for op, w in weights.items():  # binomial sd at 20,000 draws is < 0.004
        assert abs(new_ops[op] / 20_000 - w / total) < 0.015, (op, new_ops)


def test_parent_is_the_samples_best_by_pool_index_and_the_oldest_is_dropped():
    """Replays each iteration's draws from the saved RNG state (a brute-force reference):
    the child is one edge from the sample's best pool member (not from the pool member at the
    best's position inside the sample, the reference's bug), the pool keeps its size and
    drops exactly its oldest member."""
    state = evo.init_search("evolution", pool_size=12, sample_size=4, iterations=0, seed=3)
    state = evo.run_search(state, distance)
    state.iterations = 150
    wrong_parent_also_fits = 0
    while not state.done:
        rng = random.Random()
        rng.setstate(evo._rng_state_from_lists(state.rng))
        sample = rng.sample(range(len(state.pool)), state.sample_size)
        scores = [evo.rank_value(state.pool_scores[i]) for i in sample]
        best_pos = scores.index(min(scores))
        parent = evo.arch_of(state.pool[sample[best_pos]])
        buggy = evo.arch_of(state.pool[best_pos])
        before = list(zip(state.pool, state.born, strict=True))
        evo.step(state, distance)
        child = evo.arch_of(state.pool[-1])
        assert hamming(child, parent) == 1
        wrong_parent_also_fits += hamming(child, buggy) == 1 and buggy != parent
        oldest = min(range(len(before)), key=lambda i: before[i][1])
        assert list(zip(state.pool, state.born, strict=True)) == (
            before[:oldest] + before[oldest + 1:] + [(state.pool[-1], state.iteration)])
    assert wrong_parent_also_fits < 30  # the check above can tell the two apart
    # after >= pool_size iterations the pool is exactly the newest children, ages 11..0
    assert state.pool == state.hist_arch[-12:]
    assert state.ages() == list(range(11, -1, -1))


def test_negative_nan_and_inf_scores_rank_last():
    """A broken score (negative, NaN: never a condition number) or a flagged one (+inf) is
    never preferred: the reference's min() preferred a negative kappa."""
    def broken(arch: str) -> float:
        ops = parse_arch(arch)
        if ops[0] == "none":
            return -5.0
        if ops[1] == "none":
            return math.nan
        if ops[2] == "none":
            return math.inf
        return distance(arch)

    for method in evo.METHODS:
        state = search(method, score=broken, iterations=200)
        assert 1.0 <= state.best < math.inf
        best = evo.found(state)
        assert broken(best["arch"]) == best["score"] == state.best
        rows = evo.trajectory(state)
        assert all(r["best_so_far"] is None or r["best_so_far"] >= 1 for r in rows)
        assert any(r["score"] is None for r in rows)  # broken scores are written as null
        assert evo.rank_value(-5.0) == evo.rank_value(math.nan) == math.inf
    # evolution mostly mutates good parents: few children have a broken first edge
    state = search("evolution", score=broken, iterations=200)
    assert evo.rank_value(evo.median_score(state.pool_scores)) < math.inf


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", evo.METHODS)
def test_killed_search_resumes_to_the_identical_history(tmp_path, method):
    """Pure state machine: run 300 iterations uninterrupted; again, killed by the score at
    evaluation 170, resumed from its last checkpoint (through torch.save / weights_only
    load, as the runner stores it): equal histories, pools and RNG states."""
    kw = {"method": method, "pool_size": 20, "sample_size": 5, "iterations": 300, "seed": 7}
    whole = evo.run_search(evo.init_search(**kw), distance)
    calls = [0]

    def dying(arch: str) -> float:
        calls[0] += 1
        if calls[0] == 170:
            raise Killed
        return distance(arch)

    saved = {}

    def checkpoint(s: evo.SearchState) -> None:
        saved["state"] = json.loads(json.dumps(s.to_dict()))

    with pytest.raises(Killed):
        evo.run_search(evo.init_search(**kw), dying, on_step=checkpoint)
    assert len(saved["state"]["hist_score"]) == 169
    torch.save(saved["state"], tmp_path / "state.pt")
    back = evo.SearchState.from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed = evo.run_search(back, distance)
    assert resumed.to_dict() == whole.to_dict()
    assert evo.trajectory(resumed) == evo.trajectory(whole)


def test_cache_hits_isomorphic_archs_and_is_keyed_by_the_scoring_config():
    archs = all_archs()
    a = next(x for x in archs if parse_arch(x)[0] == "nor_conv_3x3"
             and parse_arch(x)[2] == parse_arch(x)[4] == "none")  # node 1 feeds nothing
    b = format_arch(["nor_conv_1x1", *parse_arch(a)[1:]])
    assert a != b and isomorphism_key(a) == isomorphism_key(b)
    c = next(x for x in archs if isomorphism_key(x) != isomorphism_key(a))
    calls = []

    def score(arch: str) -> float:
        calls.append(arch)
        return 10.0 + len(calls)

    cache = ScoreCache()
    ev = {"bn_mode": "eval", "batch_size": 96}
    f = cache.cached(score, ev)
    assert f(a) == 11.0 and f(b) == 11.0 and f(a) == 11.0  # b: isomorphic, a: revisited
    assert f(c) == 12.0 and calls == [a, c]
    assert (cache.hits, cache.misses) == (2, 2) and cache.hit_rate == 0.5
    g = cache.cached(score, {"batch_size": 96, "bn_mode": "coupled"})
    assert g(b) == 13.0 and calls == [a, c, b]  # another BN mode: a miss
    assert cache.cached(score, {"batch_size": 96, "bn_mode": "eval"})(b) == 11.0  # key order
    back = ScoreCache(json.loads(json.dumps(cache.state())))
    assert back.get(b, ev) == 11.0 and back.get(c, {"bn_mode": "coupled"}) is None
    assert (back.hits, back.misses) == (cache.hits, cache.misses)


TINY = {"pool_size": 8, "sample_size": 3, "iterations": 40, "search_seed": 1,
        "dataset": "embedded", "C": 4, "N": 1, "kappa": {"batch_size": 8, "n_init": 1}}


class DyingContext(LocalContext):
    """Dies right after its ``die_at``-th checkpoint is on disk (a SIGKILL between steps)."""

    def __init__(self, directory, die_at=None, **kw):
        super().__init__(directory, **kw)
        self.die_at, self.saves = die_at, 0

    def _persist(self, metrics):
        super()._persist(metrics)
        self.saves += 1
        if self.saves == self.die_at:
            raise Killed


@pytest.mark.parametrize("method", evo.METHODS)
def test_search_trial_killed_and_resumed_equals_uninterrupted(tmp_path, method):
    """Through the evas_search kind with a LocalContext: a search killed after its 25th
    checkpoint (iteration 17) and rerun on the same directory writes the same trajectory,
    found arch and pool, logs each iteration's score, and counts each isomorphism class it
    scored once (cache)."""
    cfg = EvasSearchConfig.model_validate({**TINY, "method": method})
    calls = []

    def score(arch):
        calls.append(arch)
        return distance(arch)

    whole_ctx = LocalContext(tmp_path / "whole", device="cpu")
    whole = run_search_trial(cfg, whole_ctx, score)
    n_calls = len(calls)
    with pytest.raises(Killed):
        run_search_trial(cfg, DyingContext(tmp_path / "k", die_at=25, device="cpu"), score)
    again_ctx = LocalContext(tmp_path / "k", device="cpu")
    again = run_search_trial(cfg, again_ctx, score)
    for name in ("trajectory.json", "found.json", "pool.json"):
        assert (again_ctx.artifact_dir / name).read_text() == (
            whole_ctx.artifact_dir / name).read_text(), name
    timing = {"iterations_per_s", "time_search_s"}
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in whole.items() if k not in timing}
    rows = json.loads((whole_ctx.artifact_dir / "trajectory.json").read_text())
    assert [r["iteration"] for r in rows] == list(range(41))
    assert whole["evaluations"] == 48 and whole["best_score"] == rows[-1]["best_so_far"]
    # one score per isomorphism class: the cache made every other evaluation free
    state = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)["search"]["search"]
    classes = {isomorphism_key(evo.arch_of(a)) for a in state["hist_arch"]}
    assert n_calls == whole["kappa_evaluations"] == len(classes)
    assert whole["cache_hits"] == 48 - len(classes)
    assert whole["hit_rate"] == pytest.approx(whole["cache_hits"] / 48)
    if method == "evolution":
        assert whole["hit_rate"] > 0  # revisits happen within 40 mutations of 8 archs
    steps = {s: m["score"] for m, s in whole_ctx.metrics_log if "score" in m}
    assert sorted(steps) == list(range(41))
    assert [steps[r["iteration"]] for r in rows] == [r["score"] for r in rows]
