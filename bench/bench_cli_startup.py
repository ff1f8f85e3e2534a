"""CLI start-up: wall time of `nasrisk --help`, `studies`, `studies --show evas-kappa` and
`plan evas-kappa` against `python -c "import torch"`, side by side in one run (each a fresh
subprocess of this interpreter, interleaved, median of --repeats).

    python bench/bench_cli_startup.py [--repeats 5]

Prints the median seconds, the ratio to `import torch` and the machine. A ratio under 1 means
the command answers before torch alone would have been imported."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    cli = [sys.executable, "-m", "nasrisk.study.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "nasrisk --help": [*cli, "--help"],
            "nasrisk studies": [*cli, "studies"],
            "nasrisk studies --show evas-kappa": [*cli, "studies", "--show", "evas-kappa"],
            # an empty workdir: no tracking store, as on a fresh clone
            "nasrisk plan evas-kappa": [*cli, "plan", "evas-kappa", "--workdir", tmp],
        }
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(a.repeats):
            for name, argv in cmds.items():  # interleaved: load drifts hit every command alike
                t0 = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=tmp)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    torch_s = med['python -c "import torch"']
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, median of {a.repeats}")
    print(f"{'command':36s} {'median s':>9s} {'min s':>7s} {'/ import torch':>15s}")
    for k, v in med.items():
        print(f"{k:36s} {v:9.2f} {min(times[k]):7.2f} {v / torch_s:15.2f}")


if __name__ == "__main__":
    main()
