"""kappa atlas throughput and the runner's share (issue 9 "Atlas": "many archs per trial so the
runner stays under 2% of compute (print the achieved ratio)"), at the `evas-atlas` smoke size
by default, side by side in one run:

1. direct: chunk 0 of the plan called as a plain function (``LocalContext``, no Ray, no MLflow);
2. runner: the same plan (every chunk) through Ray Tune + MLflow (``run_study``), in a fresh
   temporary workdir.

Printed: archs scored per minute (direct: one core; runner: the whole study, all concurrent
trials, Ray start-up excluded and included), the seconds per arch, the checkpoint share
(save time / scoring time, inside the trial) and the runner share, two ways:

* per trial: 1 - (scoring seconds) / (the trial's MLflow run wall time), i.e. everything in a
  trial that is not scoring an arch: loading data, the batch, checkpoints, the CSV, opening
  and closing its MLflow run;
* whole study: 1 - (sum of scoring seconds) / (stage wall time x concurrent trials), which
  adds actor start-up, scheduling and the tail where fewer trials than slots run.

    nice -n 10 .venv/bin/python bench/bench_atlas.py            # smoke: 200 archs, 2 chunks
    .venv/bin/python bench/bench_atlas.py --limit 40 --chunks 2  # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--limit", type=int, default=None, help="archs (default: the profile's)")
    ap.add_argument("--chunks", type=int, default=None, help="chunks (default: the profile's)")
    a = ap.parse_args()

    import yaml

    from nasrisk.analysis.load import load_runs
    from nasrisk.study.plan import RunOptions, build_plan
    from nasrisk.study.runner import init_ray, run_study
    from nasrisk.study.spec import load_spec
    from nasrisk.trials.context import LocalContext
    from nasrisk.trials.kinds.kappa_atlas import run_kappa_atlas

    spec = load_spec("evas-atlas")
    tmp = Path(tempfile.mkdtemp(prefix="nasrisk-bench-atlas-"))
    if a.limit is not None or a.chunks is not None:  # a shrunk copy of the built-in study
        raw = spec.model_dump(mode="json", by_alias=True)
        prof = raw["profiles"][a.profile]
        n_chunks = a.chunks or prof["config"].get("n_chunks", 4)
        prof["config"] = {**prof["config"], "n_chunks": n_chunks,
                          **({"limit": a.limit} if a.limit else {})}
        prof["stages"] = {"atlas": {"grid": {"chunk": list(range(n_chunks))}}}
        raw["name"] = "bench-atlas"
        f = tmp / "bench-atlas.yaml"
        f.write_text(yaml.safe_dump(raw))
        spec = load_spec(str(f))
    plan = build_plan(spec, RunOptions(profile=a.profile))
    trials = plan.stages[0].trials
    cfg0 = trials[0].config
    print(f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: "
          f"{cpu_name()}, cpu_count={os.cpu_count()}, loadavg={os.getloadavg()[0]:.1f}, "
          f"torch={torch.__version__}, python={platform.python_version()}")
    print(f"plan: {spec.name} --profile {a.profile}: {len(trials)} chunks; sizes: "
          f"{ {k: cfg0[k] for k in ('limit', 'unique', 'n_chunks', 'bn_modes', 'variants', 'n_init', 'batch_size', 'C', 'N', 'generator_channels', 'dataset')} }")

    # 1. direct, one core
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    d = run_kappa_atlas(cfg0, LocalContext(tmp / "direct", device="cpu"))
    direct_wall = time.perf_counter() - t0
    print(f"\n== direct: chunk 0 ({int(d['n_archs'])} archs), one core ==")
    print(f"wall {direct_wall:.1f} s, scoring {d['compute_s']:.1f} s "
          f"({d['seconds_per_arch']:.2f} s/arch): {60 * d['n_archs'] / direct_wall:.1f} "
          f"archs/min; checkpoints {d['checkpoint_saves']:.0f} saves, "
          f"{100 * d['checkpoint_share']:.2f}% of scoring; not scoring (data, batch, saves, "
          f"CSV) {100 * (1 - d['compute_s'] / direct_wall):.1f}% of the wall")

    # 2. the whole plan through Ray Tune + MLflow
    t0 = time.perf_counter()
    init_ray(None)
    ray_s = time.perf_counter() - t0
    out = run_study(plan, workdir=tmp / "wd")
    stage_s = out.stages[0].seconds
    if out.failed:
        sys.exit(f"{out.failed} trials failed: {out.stages[0].errors}")
    import ray

    slots = min(int(ray.cluster_resources().get("CPU", 1)), len(trials))
    runs = load_runs(out.tracking_uri, spec.name)
    wall = (runs["end_time"] - runs["start_time"]).dt.total_seconds()
    n_archs, compute = runs["n_archs"].sum(), runs["compute_s"].sum()
    print(f"\n== runner: {len(runs)} trials through Ray Tune + MLflow, {slots} at a time ==")
    print(f"ray.init {ray_s:.1f} s; stage wall {stage_s:.1f} s; {int(n_archs)} archs: "
          f"{60 * n_archs / stage_s:.1f} archs/min ({60 * n_archs / (stage_s + ray_s):.1f} "
          f"with ray.init); {runs['seconds_per_arch'].mean():.2f} s/arch inside trials "
          f"({slots} sharing the machine)")
    print(f"checkpoints: {runs['checkpoint_saves'].sum():.0f} saves, "
          f"{100 * runs['checkpoint_s'].sum() / compute:.2f}% of scoring")
    per_trial = 1 - runs["compute_s"] / wall
    print("runner share per trial (1 - scoring / MLflow run wall): "
          + ", ".join(f"{100 * v:.1f}%" for v in per_trial)
          + f"; overall {100 * (1 - compute / wall.sum()):.2f}%")
    print(f"runner share of the study (1 - scoring / (stage wall x {slots})): "
          f"{100 * (1 - compute / (stage_s * slots)):.2f}%")
    print(f"side by side: direct {d['seconds_per_arch']:.2f} s/arch on one idle-ish core; "
          f"runner {runs['seconds_per_arch'].mean():.2f} s/arch with {slots} trials at once")


if __name__ == "__main__":
    main()
