"""Runner overhead per trial: trivial trials through Ray Tune + MLflow vs the same trial
function called directly, side by side in one run; with and without actor reuse.

    python bench/bench_runner.py [--trials 40]

Prints absolute seconds per trial, the overhead ratio and the machine."""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()

    from nasrisk.study.plan import RunOptions, build_plan
    from nasrisk.study.runner import init_ray, run_study
    from nasrisk.study.spec import load_spec
    from nasrisk.trials.context import LocalContext
    from nasrisk.trials.kinds.calibrate import run_calibrate

    tmp = Path(tempfile.mkdtemp(prefix="nasrisk-bench-"))
    cfgs = [{"index": i, "epochs": a.epochs, "size": 32} for i in range(a.trials)]

    t0 = time.perf_counter()
    for c in cfgs:
        run_calibrate(c, LocalContext(tmp / "direct" / str(c["index"])))
    direct = (time.perf_counter() - t0) / a.trials

    study = {"name": "bench-runner", "default_profile": "smoke",
             "stages": [{"name": "probe", "kind": "calibrate",
                         "config": {"epochs": a.epochs, "size": 32},
                         "grid": {"index": list(range(a.trials))}}],
             "profiles": {"smoke": {}}}
    f = tmp / "bench-runner.yaml"
    f.write_text(yaml.safe_dump(study))
    plan = build_plan(load_spec(str(f)), RunOptions())
    t0 = time.perf_counter()
    init_ray(None)
    ray_init = time.perf_counter() - t0
    results = {}
    for reuse in ("1", "0"):
        os.environ["NASRISK_REUSE_ACTORS"] = reuse
        out = run_study(plan, workdir=tmp / f"wd-reuse{reuse}")
        results[reuse] = out.stages[0].seconds / a.trials

    cpus = os.cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {cpus} CPUs, "
          f"python {platform.python_version()}")
    print(f"{a.trials} trivial trials x {a.epochs} checkpointed epochs, 1 CPU per trial")
    print(f"ray.init (once per study run):          {ray_init:8.2f} s")
    print(f"direct call per trial:                  {direct * 1000:8.1f} ms")
    for reuse, label in (("1", "Tune+MLflow, actors reused"), ("0", "Tune+MLflow, new actor each")):
        per = results[reuse]
        print(f"{label + ' per trial:':40s}{per * 1000:8.1f} ms  (x{per / direct:.0f} direct; "
              f"{per * min(cpus, a.trials):.2f} s of a core each at {cpus} concurrent)")
    print(f"actor reuse speed-up: x{results['0'] / results['1']:.2f}")


if __name__ == "__main__":
    main()
