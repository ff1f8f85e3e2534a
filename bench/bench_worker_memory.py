"""Where a Ray worker's memory goes: resident set size (RSS) after each import stage of the
trial code, how much of it is CUDA libraries mapped into the process, an idle Ray worker that
has imported the trainable, and one running a calibrate trial and one
evas-kappa smoke trial (about a minute on 2 cores; --no-evas skips it).

    python bench/bench_worker_memory.py [--no-evas]

Each import stage runs in a fresh interpreter (so a stage's figure is its own, cumulative over
the stages before it); RSS is VmRSS from /proc, the CUDA share is the summed Rss of mappings
whose path names libcuda/cublas/cudnn/nccl/... (Linux only). Prints MiB and the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

#: cumulative import stages of a worker running a trial
STAGES = [
    ("python", ""),
    ("+ torch", "import torch"),
    ("+ ray.tune", "import torch; from ray import tune"),
    ("+ mlflow", "import torch; from ray import tune; import mlflow"),
    ("+ nasrisk.trials (all kinds)", "import torch; from ray import tune; import mlflow; "
     "import nasrisk.trials; from nasrisk.trials.registry import TRIAL_KINDS; "
     "TRIAL_KINDS.get('evas')"),
    ("+ nasrisk.study.trainable", "import nasrisk.study.trainable"),
]

PROBE = r"""
import json, re
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
def cuda_rss():
    total, path = 0, ''
    pat = re.compile(r'(libcuda|cublas|cudnn|nccl|cufft|curand|cusparse|cusolver|nvrtc|'
                     r'cupti|nvjitlink|libtorch_cuda|libc10_cuda|triton)')
    for line in open('/proc/self/smaps'):
        parts = line.split()
        if parts and '-' in parts[0] and len(parts) >= 5 and not parts[0].endswith(':'):
            path = parts[5] if len(parts) > 5 else ''
        elif line.startswith('Rss:') and pat.search(path):
            total += int(parts[1])
    return total / 1024
def pss():
    # (PSS, anonymous) MiB: a shared library page counts 1/k in PSS of each of the k processes
    # mapping it; anonymous memory (heap, tensors) is each worker's own: N workers cost about
    # N x anonymous + one copy of the libraries
    vals = {}
    for line in open('/proc/self/smaps_rollup'):
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            vals[parts[0].rstrip(':')] = int(parts[1])
    return vals.get('Pss', 0) / 1024, vals.get('Anonymous', 0) / 1024
def modules():
    import sys
    return sorted({m.split('.')[0] for m in sys.modules})
"""


def stage(code: str) -> dict:
    src = (f"{PROBE}\n{code}\nimport sys\n"
           "print(json.dumps({'rss': rss(), 'cuda': cuda_rss(), 'pss': pss(), "
           "'torchvision': 'torchvision' in sys.modules, 'n_modules': len(sys.modules)}))")
    out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                         check=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def ray_workers(with_evas: bool) -> dict:
    """RSS of an idle Ray worker that imported the trainable, and of one running a calibrate
    trial (LocalContext, 20 epochs of a 256x256 matrix power)."""
    import tempfile

    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        class Worker:
            def idle(self) -> dict:
                import nasrisk.study.trainable  # noqa: F401
                ns: dict = {}
                exec(PROBE, ns)  # noqa: S102 - the probe source above, not user input
                return {"rss": ns["rss"](), "cuda": ns["cuda_rss"](), "pss": ns["pss"]()}

            def evas(self) -> dict:
                """One evas-kappa smoke trial (embedded digits), as a worker runs it."""
                from nasrisk.study.plan import RunOptions, build_plan
                from nasrisk.study.spec import load_spec
                from nasrisk.trials.context import LocalContext
                from nasrisk.trials.registry import TRIAL_KINDS
                ns: dict = {}
                exec(PROBE, ns)  # noqa: S102
                plan = build_plan(load_spec("evas-kappa"), RunOptions(profile="smoke",
                                                                     num_archs=1))
                t = plan.stages[0].trials[0]
                with tempfile.TemporaryDirectory() as d:
                    TRIAL_KINDS.get("evas")(t.config, LocalContext(d, device="cpu"))
                peak = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
                out = {"rss": ns["rss"](), "cuda": ns["cuda_rss"](), "pss": ns["pss"](),
                       "peak": int(peak[0].split()[1]) / 1024}
                from nasrisk.study.trainable import release_memory
                release_memory()  # what run_trial does after each trial
                out["released"] = {"rss": ns["rss"](), "cuda": ns["cuda_rss"](),
                                   "pss": ns["pss"]()}
                return out

            def calibrate(self) -> dict:
                from nasrisk.trials.context import LocalContext
                from nasrisk.trials.kinds.calibrate import run_calibrate
                ns: dict = {}
                exec(PROBE, ns)  # noqa: S102
                with tempfile.TemporaryDirectory() as d:
                    run_calibrate({"epochs": 20, "size": 256}, LocalContext(d, device="cpu"))
                peak = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
                return {"rss": ns["rss"](), "cuda": ns["cuda_rss"](), "pss": ns["pss"](),
                        "peak": int(peak[0].split()[1]) / 1024}

        # one CPU: the bare task runs (and frees it) before the actor takes it
        bare = ray.get(ray.remote(num_cpus=1)(_bare_rss).remote())
        w = Worker.remote()
        idle = ray.get(w.idle.remote())
        busy = ray.get(w.calibrate.remote())
        evas = ray.get(w.evas.remote()) if with_evas else None
        return {"bare": bare, "idle": idle, "calibrate": busy, "evas": evas}
    finally:
        ray.shutdown()


def _bare_rss() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}")
    with_evas = "--no-evas" not in sys.argv
    print(f"{'stage':34s} {'RSS MiB':>8s} {'CUDA libs':>10s} {'PSS':>6s} {'anon':>8s}"
          "  torchvision")

    def row(name: str, r: dict, extra: str = "") -> None:
        print(f"{name:34s} {r['rss']:8.0f} {r['cuda']:10.0f} {r['pss'][0]:6.0f} "
              f"{r['pss'][1]:8.0f}  {extra}")

    for name, code in STAGES:
        r = stage(code)
        row(name, r, str(r["torchvision"]))
    w = ray_workers(with_evas)
    print(f"{'ray worker, bare task':34s} {w['bare']:8.0f}")
    row("ray worker, trainable imported", w["idle"])
    row("ray worker, after calibrate trial", w["calibrate"], f"peak {w['calibrate']['peak']:.0f}")
    if w["evas"]:
        row("ray worker, after evas smoke trial", w["evas"], f"peak {w['evas']['peak']:.0f}")
        row("  ... then gc + malloc_trim (idle)", w["evas"]["released"])


if __name__ == "__main__":
    main()
