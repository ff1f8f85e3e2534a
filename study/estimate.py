"""`nasrisk plan`: what a study would run, and what it would cost, from measurements.

Cost comes from finished trials of the same study, stage and profile in the tracking store
(their ``time_total_s`` metric); without one the plan says so instead of guessing."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

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
        else:
            how = ("a few trials (e.g. --num-archs 4)" if st.spec.archs is not None else
                   "part of the study (stop it any time; `nasrisk resume` goes on)")
            lines.append(f"    no measured cost for profile {plan.profile} in {uri} yet: run "
                         f"{how} and plan again")
    return "\n".join(lines)
