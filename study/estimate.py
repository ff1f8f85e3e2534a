"""`nasrisk plan`: what a study would run, and what it would cost, from measurements.

Cost comes first from finished trials of the same study, stage and profile in the tracking
store (their ``time_total_s`` metric). Without those, a cost model per trial kind and size:

    seconds(trial) = cost per unit x size(trial),
    size = epochs x training images x width       (kinds that train: victim, evas, ...)
    width = C^2 x cells      (NATS: cells = 3N + 2; DARTS-style model_kwargs: C^2 x layers)

(other kinds: :data:`SIZE_FACTORS`), where the cost per unit is the median of
``time_total_s / size`` over every finished trial of the same kind in the store, of any study
and profile (typically the smoke runs); when those trials came in several sizes, a least-squares
line ``overhead + cost per unit x size`` instead (a fixed per-trial overhead: start-up, data
loading). The uncertainty printed is the spread of the calibrating trials' measured over fitted
seconds (max / min, at least 2x), doubled when the plan extrapolates more than 100x in size
beyond them.

Deviations: C^2 x cells stands in for the forward FLOPs (per-op FLOPs would need the model
built, i.e. torch imported, which `plan` avoids); a manual model without ``C`` counts as width
1, so calibrating one manual model by another is crude. From trials of one size the fixed
overhead cannot be told apart and is scaled with the size, so scaling small runs up
overestimates; and the calibrating runs' hardware (typically CPUs) sets the speed, not the
plan's GPUs.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tags
from .plan import StudyPlan
from .workdir import Workdir


def measured_seconds(uri: str, study: str, stage: str, profile: str) -> list[float]:
    from .tracking import TAG_ROLE, TAG_STAGE, TAG_STATUS, client

    c = client(uri)
    exp = c.get_experiment_by_name(study)
    if exp is None:
        return []
    filt = (f"tags.`{TAG_ROLE}` = 'trial' and tags.`{TAG_STATUS}` = 'done' and "
            f"tags.`{TAG_STAGE}` = '{stage}' and tags.`nasrisk.profile` = '{profile}'")
    runs = c.search_runs([exp.experiment_id], filter_string=filt, max_results=500)
    return [r.data.metrics["time_total_s"] for r in runs if "time_total_s" in r.data.metrics]


#: training images per dataset when a config does not cap them (``max_train_examples``)
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "embedded": 4_000,
                "imagenet32-60": 76_800, "imagenet16-120": 151_700}
#: NATS-Bench's 15,625 cell strings and their 6,466 isomorphism classes (the atlas' space)
N_ARCHS, N_UNIQUE = 15_625, 6_466


def flat_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.epochs": 3, ...}``: the shape of a trial run's MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v))
    except (TypeError, ValueError):
        return None


def _width(p: Mapping[str, Any], prefix: str = "") -> float | None:
    c, n = _num(p.get(prefix + "C")), _num(p.get(prefix + "N"))
    if c and n:
        return c * c * (3 * n + 2)
    c, layers = _num(p.get(prefix + "model_kwargs.C")), _num(p.get(prefix + "model_kwargs.layers"))
    if c and layers:
        return c * c * layers
    return None


def _images(p: Mapping[str, Any], prefix: str = "") -> float | None:
    return _num(p.get(prefix + "max_train_examples")) or TRAIN_IMAGES.get(
        str(p.get(prefix + "dataset")))


def _chunk_archs(p: Mapping[str, Any]) -> float | None:
    space = N_UNIQUE if str(p.get("unique")).lower() == "true" else N_ARCHS
    limit = _num(p.get("limit"))
    return (min(limit, space) if limit else space) / (_num(p.get("n_chunks")) or 1)


#: per kind, the size factors (name, value from the flattened config; None: not applicable)
SIZE_FACTORS: dict[str, tuple[tuple[str, Callable[[Mapping[str, Any]], float | None]], ...]] = {
    "attack": (("inputs", lambda p: _num(p.get("n_inputs"))),
               ("width", lambda p: _width(p, "victim."))),
    "kappa_atlas": (("archs", _chunk_archs), ("inits", lambda p: _num(p.get("n_init"))),
                    ("batch", lambda p: _num(p.get("batch_size"))), ("width", _width)),
    "evas_search": (("iterations", lambda p: _num(p.get("iterations"))),
                    ("inits", lambda p: _num(p.get("kappa.n_init"))),
                    ("batch", lambda p: _num(p.get("kappa.batch_size"))), ("width", _width)),
    "calibrate": (("epochs", lambda p: _num(p.get("epochs"))),),
}
TRAINING_FACTORS = (("epochs", lambda p: _num(p.get("train.epochs"))), ("images", _images),
                    ("width", _width))


def trial_size(kind: str, params: Mapping[str, Any]) -> tuple[float, tuple[str, ...]]:
    """(size, names of the factors that applied) of one trial's flattened config."""
    size, used = 1.0, []
    for name, fn in SIZE_FACTORS.get(kind, TRAINING_FACTORS):
        v = fn(params)
        if v is not None and v > 0:
            size *= v
            used.append(name)
    return size, tuple(used)


@dataclass(frozen=True)
class Calibration:
    """``seconds = overhead + per_unit x size`` of one kind, from finished trials of any
    profile (``overhead`` 0 unless they came in at least two sizes)."""

    kind: str
    per_unit: float
    overhead: float
    n: int
    spread: float  # max / min of measured over fitted seconds
    size: float  # the calibrating trials' median size
    profiles: tuple[str, ...]

    def seconds(self, size: float) -> float:
        return self.overhead + self.per_unit * size


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(overhead, per unit) of ``seconds = overhead + per_unit x size`` over (size, seconds):
    least squares when the sizes differ and both come out positive, else the median of
    seconds / size with no overhead."""
    sizes = [x for x, _ in points]
    if len(set(sizes)) > 1:
        mx, my = statistics.fmean(sizes), statistics.fmean(y for _, y in points)
        b = (sum((x - mx) * (y - my) for x, y in points)
             / sum((x - mx) ** 2 for x in sizes))
        a = my - b * mx
        if a >= 0 and b > 0:
            return a, b
    return 0.0, statistics.median(y / x for x, y in points)


def calibration(uri: str, kind: str) -> Calibration | None:
    from .tracking import TAG_KIND, TAG_ROLE, TAG_STATUS, client

    c = client(uri)
    ids = [e.experiment_id for e in c.search_experiments()]
    if not ids:
        return None
    filt = (f"tags.`{TAG_ROLE}` = 'trial' and tags.`{TAG_STATUS}` = 'done' and "
            f"tags.`{TAG_KIND}` = '{kind}'")
    points, profiles = [], set()
    for r in c.search_runs(ids, filter_string=filt, max_results=1000):
        t = r.data.metrics.get("time_total_s")
        if t is None or t <= 0:
            continue
        points.append((trial_size(kind, r.data.params)[0], t))
        profiles.add(r.data.tags.get(tags.PROFILE, "?"))
    if not points:
        return None
    a, b = fit(points)
    ratios = [y / (a + b * x) for x, y in points]
    return Calibration(kind, b, a, len(points), max(ratios) / min(ratios),
                       statistics.median(x for x, _ in points), tuple(sorted(profiles)))


def modelled_line(st: Any, n: int, cal: Calibration, cpus: int) -> str:
    """The plan's estimate line of a stage of ``n`` trials from the kind's cost model."""
    sizes = [trial_size(st.spec.kind, flat_config(t.config)) for t in st.trials]
    per_trial = statistics.fmean(cal.seconds(s) for s, _ in sizes)
    factors = " x ".join(sizes[0][1]) or "one trial"
    ratio = statistics.fmean(s for s, _ in sizes) / cal.size
    uncertain = max(2.0, cal.spread) * (2 if ratio > 100 else 1)
    hours = per_trial * n / 3600
    conc = max(1, math.floor(cpus / st.resources.cpu))
    from .progress import fmt_duration

    return (f"    modelled: from {cal.n} finished {cal.kind} trials (profile "
            f"{', '.join(cal.profiles)}) scaled by {factors} ({ratio:.3g}x their size"
            f"{'' if not cal.overhead else f', plus {cal.overhead:.0f} s fixed per trial'}): "
            f"~{fmt_duration(per_trial)} per trial, ~{hours:.3g} trial-hours at their "
            f"speed (CPU-hours if they ran on one CPU each), "
            f"~{fmt_duration(math.ceil(n / conc) * per_trial)} wall on {cpus} CPUs; "
            f"uncertain by ~{uncertain:.0f}x")


def describe_plan(plan: StudyPlan, *, workdir: str | Path | None = None,
                  tracking_uri: str | None = None, cpus: int | None = None) -> str:
    from .probes import sqlite_path, sqlite_uri

    wd = Workdir.at(workdir)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(wd.root / "mlflow.db")
    db = sqlite_path(uri)
    have_store = db.exists() if db is not None else not uri.startswith("sqlite:")
    cpus = cpus or os.cpu_count() or 1
    derived = any(st.derived is not None for st in plan.stages)
    n_derived = plan.n_derived
    more = ("" if not derived else f" + up to {n_derived} derived" if n_derived is not None
            else " + derived (how many is known once their sources have run)")
    lines = [f"study {plan.spec.name}, profile {plan.profile}, parameter set {plan.params}: "
             f"{plan.n_trials} trials{more}"]
    for st in plan.stages:
        r = st.resources
        d = st.derived
        n = len(st.trials) if d is None else d.upper
        if d is None:
            count = f"{n} trials"
        else:
            count = f"derived from {d.source}: up to {'?' if n is None else n} trials"
        lines.append(f"  stage {st.spec.name} ({st.spec.kind}): {count}, "
                     f"{r.cpu:g} CPU + {r.gpu:g} GPU each")
        if d is not None:
            lines.append(f"    selector {d.describe()}")
            if n is None:
                lines.append(f"    (the count depends on the artifacts {d.source}'s trials "
                             "write)")
        for t in st.trials[:3]:
            lines.append(f"    e.g. {t.name}  [key {t.key}]")
        secs = measured_seconds(uri, plan.spec.name, st.spec.name, plan.profile) if have_store else []
        if secs and n is not None:
            from .progress import fmt_duration  # imports Ray: only once there is a measurement

            mean = statistics.fmean(secs)
            conc = max(1, math.floor(cpus / r.cpu))
            wall = math.ceil(n / conc) * mean
            upto, about = ("", "about") if d is None else ("up to ", "at most about")
            lines.append(f"    measured: {mean:.1f} s per trial (n={len(secs)}) -> {upto}"
                         f"{mean * n * r.cpu / 3600:.2f} CPU-hours; {about} "
                         f"{fmt_duration(wall)} wall on {cpus} CPUs ({conc} at a time)")
        elif secs:
            lines.append(f"    measured: {statistics.fmean(secs):.1f} s per trial "
                         f"(n={len(secs)})")
        elif (cal := calibration(uri, st.spec.kind) if have_store and n and st.trials
              else None) is not None:
            lines.append(modelled_line(st, n, cal, cpus))
        else:
            how = ("a few trials (e.g. --num-archs 4)" if st.spec.archs is not None else
                   "part of the study (stop it any time; `nasrisk resume` goes on)")
            lines.append(f"    no measured cost for profile {plan.profile} in {uri} yet: run "
                         f"{how} and plan again")
    return "\n".join(lines)
