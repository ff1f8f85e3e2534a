"""One-line progress for long studies: trials done / running / failed, elapsed, ETA."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from .guard import active_guard

#: a result key whose value a trial wants shown on the driver's console (see trainable.py)
WARNING_KEY = "nasrisk_warning"


def _stopping() -> bool:
    g = active_guard()
    return g is not None and g.stopping()


def fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class ProgressPrinter(Callback):
    """Prints a status line when a trial starts, ends or fails, and every ``every`` seconds.

    ``already_done`` counts trials that MLflow says are finished (not given to Tune)."""

    def __init__(self, label: str, total: int, already_done: int = 0, every: float = 30.0,
                 stream: Any = None) -> None:
        self.label, self.total, self.already = label, total, already_done
        self.every = every
        self.stream = stream
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.time()
        self.last = 0.0
        self.done = 0
        self.failed: dict[str, str] = {}
        self.running: set[str] = set()

    def __setstate__(self, state: dict[str, Any]) -> None:  # restored with the experiment
        self.__dict__.update(state)
        self._reset()

    def line(self) -> str:
        elapsed = time.time() - self.t0
        finished = self.already + self.done
        left = self.total - finished - len(self.failed)
        eta = "?" if self.done == 0 else fmt_duration(elapsed / self.done * left)
        return (f"[{self.label}] {finished}/{self.total} done, {len(self.running)} running, "
                f"{len(self.failed)} failed | elapsed {fmt_duration(elapsed)} | ETA {eta}")

    def _print(self) -> None:
        self.last = time.time()
        print(self.line(), file=self.stream or sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self.failed.pop(trial.trial_id, None)
        self._print()

    def on_trial_recover(self, iteration, trials, trial, **info):
        if not _stopping():
            print(f"[{self.label}] trial {trial} failed, retrying from its last checkpoint",
                  file=self.stream or sys.stdout, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        warning = result.get(WARNING_KEY)
        if warning:
            print(f"[{self.label}] warning: {' '.join(str(warning).split())}",
                  file=self.stream or sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        if not (trial.last_result or {}).get("trial_done"):
            return  # stopped with the study, not finished
        self.done += 1
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.failed[trial.trial_id] = str(trial)
        if not _stopping():
            self._print()

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last >= self.every:
            self._print()
