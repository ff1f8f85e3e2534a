"""One-line progress for long studies: trials done / running / failed, elapsed, ETA.

One line per event: a finished or failed trial prints exactly one line (the trials that start
in its place are counted in the next line, not announced on lines of their own), the first
trials starting print one line between them, and a heartbeat line follows every ``every``
seconds without events.

ETA. A running trial's checkpoint reports carry ``epoch`` (the furthest epoch its state holds)
and, when the trial knows it, ``epochs_total`` (trainable.py), so its fraction done is
``epoch / epochs_total``; its expected duration is its time so far divided by that fraction.
A trial's duration ``T`` is the mean of the finished trials' wall times when any finished, else
the mean of the running trials' expected durations. The remaining work is the running trials'
remaining time (``T - elapsed``, or their own progress rate once they report epochs) plus ``T``
for each trial not yet started, shared by as many slots as ever ran at once. The estimated
finish time is smoothed (exponential, weight :data:`SMOOTHING` for each new estimate) so the
ETA does not jump with every report. Before any epoch or trial finished the line says so
instead of printing a number.

Deviations: a trial resumed from a checkpoint reports its first epoch after only part of an
epoch's wall time, so its own rate is overestimated until its second report (the smoothing
absorbs it); kinds with several training parts report the furthest part's epoch only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback

from .guard import active_guard

#: a result key whose value a trial wants shown on the driver's console (see trainable.py)
WARNING_KEY = "nasrisk_warning"
#: result keys of a trial's progress (trainable.py reports them with each checkpoint)
EPOCH_KEY, EPOCHS_TOTAL_KEY = "epoch", "epochs_total"
#: weight of a new estimate of the finish time (the rest stays with the previous one)
SMOOTHING = 0.3


def _stopping() -> bool:
    g = active_guard()
    return g is not None and g.stopping()


def fmt_duration(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h >= 48:
        return f"{h // 24}d{h % 24:02d}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


@dataclass
class _Running:
    started: float
    fraction: float = 0.0      # epochs done / epochs total at the latest report (0: none yet)
    first_at: float | None = None   # time and fraction of the first progress report
    first_fraction: float = 0.0
    last_at: float | None = None

    def expected_total(self) -> float | None:
        """Seconds this trial takes in all, from its own progress (None before a report)."""
        if self.last_at is None or self.fraction <= 0:
            return None
        if self.first_at is not None and self.last_at > self.first_at \
                and self.fraction > self.first_fraction:
            rate = (self.fraction - self.first_fraction) / (self.last_at - self.first_at)
        else:
            rate = self.fraction / max(self.last_at - self.started, 1e-9)
        return (self.last_at - self.started) + (1 - self.fraction) / rate

    def remaining(self, now: float, per_trial: float | None) -> float | None:
        own = self.expected_total()
        total = own if own is not None else per_trial
        return None if total is None else max(0.0, self.started + total - now)


class ProgressPrinter(Callback):
    """Prints one status line per finished or failed trial, one when the first trials start,
    and one every ``every`` seconds otherwise (see the module docstring for the ETA).

    ``already_done`` counts trials that MLflow says are finished (not given to Tune);
    ``clock`` is for tests."""

    def __init__(self, label: str, total: int, already_done: int = 0, every: float = 30.0,
                 stream: Any = None, clock: Callable[[], float] = time.time) -> None:
        self.label, self.total, self.already = label, total, already_done
        self.every = every
        self.stream = stream
        self.clock = clock
        self._reset()

    def _reset(self) -> None:
        self.t0 = self.clock()
        self.last = 0.0
        self.printed = 0
        self.done = 0
        self.failed: dict[str, str] = {}
        self.running: dict[str, _Running] = {}
        self.durations: list[float] = []
        self.slots = 0
        self._finish: float | None = None  # smoothed estimate of when the stage ends

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "clock"}

    def __setstate__(self, state: dict[str, Any]) -> None:  # restored with the experiment
        self.__dict__.update(state)
        self.clock = time.time
        self._reset()

    # -- the ETA -----------------------------------------------------------------------------
    def _per_trial(self) -> float | None:
        if self.durations:
            return sum(self.durations) / len(self.durations)
        own = [t for r in self.running.values() if (t := r.expected_total()) is not None]
        return sum(own) / len(own) if own else None

    def eta_seconds(self) -> float | None:
        """Seconds until the stage ends (smoothed), or None before anything is measured."""
        now = self.clock()
        per_trial = self._per_trial()
        if per_trial is None:
            return None
        left = [r.remaining(now, per_trial) for r in self.running.values()]
        left = [x for x in left if x is not None]
        queued = max(0, self.total - self.already - self.done - len(self.failed)
                     - len(self.running))
        slots = max(self.slots, len(self.running), 1)
        work = sum(left) + queued * per_trial
        raw = max(max(left, default=0.0), work / slots)
        new_finish = now + raw
        if self._finish is None:
            self._finish = new_finish
        else:
            self._finish = SMOOTHING * new_finish + (1 - SMOOTHING) * self._finish
        return max(0.0, self._finish - now)

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        finished = self.already + self.done
        eta_s = self.eta_seconds()
        if finished + len(self.failed) >= self.total:
            eta = "0m00s"
        elif eta_s is None:
            eta = "after the first epoch or trial"
        else:
            eta = "~" + fmt_duration(eta_s)
        return (f"[{self.label}] {finished}/{self.total} done, {len(self.running)} running, "
                f"{len(self.failed)} failed | elapsed {fmt_duration(elapsed)} | ETA {eta}")

    def _print(self, prefix: str = "") -> None:
        self.last = self.clock()
        self.printed += 1
        print(prefix + self.line(), file=self.stream or sys.stdout, flush=True)

    # -- Tune callback events ------------------------------------------------------------------
    def on_trial_start(self, iteration, trials, trial, **info):
        self.running[trial.trial_id] = _Running(started=self.clock())
        self.slots = max(self.slots, len(self.running))
        self.failed.pop(trial.trial_id, None)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if not _stopping():
            print(f"[{self.label}] trial {trial} failed, retrying from its last checkpoint",
                  file=self.stream or sys.stdout, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        warning = result.get(WARNING_KEY)
        if warning:
            print(f"[{self.label}] warning: {' '.join(str(warning).split())}",
                  file=self.stream or sys.stderr, flush=True)
        r = self.running.get(trial.trial_id)
        epoch, total = result.get(EPOCH_KEY), result.get(EPOCHS_TOTAL_KEY)
        if r is None or not isinstance(epoch, (int, float)) or not total or total <= 0:
            return
        now = self.clock()
        r.fraction = min(1.0, max(0.0, float(epoch) / float(total)))
        if r.first_at is None:
            r.first_at, r.first_fraction = now, r.fraction
        r.last_at = now

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = self.running.pop(trial.trial_id, None)
        if not (trial.last_result or {}).get("trial_done"):
            return  # stopped with the study, not finished
        self.done += 1
        if r is not None:
            self.durations.append(self.clock() - r.started)
        self._print()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.pop(trial.trial_id, None)
        self.failed[trial.trial_id] = str(trial)
        if not _stopping():
            self._print()

    def on_step_end(self, iteration, trials, **info):
        if (self.printed == 0 and self.running) or (
                self.printed and self.clock() - self.last >= self.every):
            self._print()
