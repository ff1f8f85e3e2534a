"""Stopping a study cleanly: on SIGINT / SIGTERM, or when its tracking store vanishes or its
workdir stops being writable.

:class:`StudyGuard` is entered by the runner around a study. While it is active:

* SIGINT and SIGTERM only *ask* the study to stop: Tune stops every trial (the trials mark
  their MLflow runs ``stopped``, not failed), the runner raises :class:`StudyInterrupted`, and
  the CLI prints how to resume and exits 128 + the signal number (130 / 143). A second
  signal stops at once (``KeyboardInterrupt``).
* the SQLite store is watched (at most every :data:`CHECK_EVERY_S`): deleted, replaced by
  another file, or in a folder that can no longer be written. The first such check stops the
  study the same way and the runner raises :class:`StoreLost` (one line, exit 2) instead of
  letting every trial fail and retry against a store that is gone. The driver holds the
  database file open from the start, so a store deleted mid-run still exists for it: it is
  written back (the finished trials in it are kept) and a recreated file is moved aside.
* Ray's log lines are dropped once the guard is stopping (a log record checks the store at
  once): the one line the runner prints says what happened; the trial errors the fault
  causes would only repeat it.

The guard is process-wide (signal handlers are): the Tune stopper finds it through
:func:`active_guard`, so a stopper pickled with an experiment works in the next driver.

Deviations: the store watch covers local SQLite stores; a tracking server that goes away
makes trials fail (and retry) as before.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nasrisk.trials.errors import UserError

CHECK_EVERY_S = 0.5
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_ACTIVE: StudyGuard | None = None


class StudyInterrupted(UserError):
    """The study was stopped by a signal; ``exit_code`` is 128 + its number."""

    def __init__(self, signum: int, resume_hint: str) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: trials stopped, finished ones kept; "
                         f"`{resume_hint}` continues where it stopped")


class StoreLost(UserError):
    """The tracking store or the workdir failed mid-run (deleted, replaced, read-only)."""


def active_guard() -> StudyGuard | None:
    return _ACTIVE


class StudyGuard:
    """See the module docstring. ``db`` is the SQLite file of the tracking store (None for a
    server); ``writable`` are folders the study must be able to write (workdir, Tune dir)."""

    def __init__(self, *, resume_hint: str, db: Path | None, writable: list[Path]) -> None:
        self.resume_hint = resume_hint
        self.db = Path(db) if db else None
        self.writable = [Path(p) for p in writable]
        self.signum: int | None = None
        self.problem: str | None = None
        self._kind: str | None = None  # "vanished" (deleted / replaced) or "readonly"
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._last = 0.0
        self._old_handlers: dict[int, Any] = {}
        self._lock = threading.Lock()

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> StudyGuard:
        global _ACTIVE
        _ACTIVE = self
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():
            for s, h in self._old_handlers.items():
                signal.signal(s, h)
        self._old_handlers.clear()
        unmute_ray_logs()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _ACTIVE = None

    def install(self) -> None:
        """(Re)install the signal handlers: call again after ``ray.init``, which sets its own
        SIGTERM handler."""
        mute_ray_logs_when_stopping()
        if threading.current_thread() is not threading.main_thread():
            return
        for s in _SIGNALS:
            old = signal.signal(s, self._on_signal)
            if old != self._on_signal:
                self._old_handlers.setdefault(s, old)

    def watch_store(self) -> None:
        """Hold the SQLite file open (call once the store exists)."""
        if self.db is None or self._fd is not None:
            return
        try:
            self._fd = os.open(self.db, os.O_RDONLY)
        except OSError:
            return
        st = os.fstat(self._fd)
        self._ident = (st.st_dev, st.st_ino)

    # -- signals ----------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: do not wait for the trials
        self.signum = signum
        print(f"nasrisk: {signal.Signals(signum).name} received: stopping the trials "
              "(again to stop at once)", file=sys.stderr, flush=True)

    # -- store ------------------------------------------------------------------------------
    def check_store(self, force: bool = False) -> str | None:
        """The store's problem, in words, or None (checked at most every CHECK_EVERY_S)."""
        if self.problem is not None:
            return self.problem
        now = time.monotonic()
        if not force and now - self._last < CHECK_EVERY_S:
            return None
        with self._lock:
            self._last = now
            problem, kind = self._find_problem()
            if problem is not None and self.problem is None:
                self.problem, self._kind = problem, kind
        return self.problem

    def _find_problem(self) -> tuple[str | None, str | None]:
        if self.db is not None and self._ident is not None:
            try:
                st = os.stat(self.db)
            except FileNotFoundError:
                return f"the MLflow store {self.db} was deleted while the study ran", "vanished"
            except OSError as e:
                return f"the MLflow store {self.db} cannot be read ({e.strerror})", "readonly"
            if (st.st_dev, st.st_ino) != self._ident:
                return (f"the MLflow store {self.db} was replaced by another file while the "
                        "study ran", "vanished")
        for p in [*self.writable, *([self.db] if self.db is not None else [])]:
            if p.exists() and not os.access(p, os.W_OK):
                return f"{p} can no longer be written", "readonly"
        return None, None

    def should_stop(self) -> bool:
        return self.signum is not None or self.check_store() is not None

    def stopping(self) -> bool:
        """Like :meth:`should_stop`, checking the store now (for rare events: log lines)."""
        return self.signum is not None or self.check_store(force=True) is not None

    # -- after Tune stopped -----------------------------------------------------------------
    def raise_if_stopped(self) -> None:
        """Raise what stopped the study, if anything did (call once Tune has returned)."""
        if self.signum is not None:
            raise StudyInterrupted(self.signum, self.resume_hint)
        if self.check_store(force=True) is None:
            return
        if self._kind == "vanished":
            raise StoreLost(f"{self.problem}: stopped the study; {self._write_back()}; "
                            f"`{self.resume_hint}` continues")
        raise StoreLost(f"{self.problem}: stopped the study (finished trials are kept in "
                        f"MLflow); make it writable again, then `{self.resume_hint}` continues")

    def _write_back(self) -> str:
        """Put the store this driver holds open back in place; says what it did."""
        assert self.db is not None
        if self._fd is None:
            return "its finished trials are lost and will be rerun"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = ""
        if self.db.exists():
            aside = self.db.with_name(f"{self.db.name}.replaced-{stamp}")
            os.replace(self.db, aside)
            moved = f"; the file found in its place is now {aside.name}"
        tmp = self.db.with_name(f".{self.db.name}.rescued-{stamp}")
        try:
            with open(tmp, "wb") as out:
                os.lseek(self._fd, 0, os.SEEK_SET)
                while block := os.read(self._fd, 1 << 20):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            ok = _sqlite_ok(tmp)
            if ok:
                os.replace(tmp, self.db)
                return ("wrote the store back from the copy this driver held open (its finished "
                    f"trials are kept){moved}")
            keep = self.db.with_name(f"{self.db.name}.rescued-{stamp}")
            os.replace(tmp, keep)
            return f"the copy this driver held open fails SQLite's check: kept as {keep}{moved}"
        except OSError as e:
            return f"could not write the store back ({e.strerror}); its finished trials will be rerun{moved}"


def _sqlite_ok(path: Path) -> bool:
    """The start-up probe's check (header, schema, quick_check) of the rescued copy."""
    from .probes import check_sqlite_store

    try:
        check_sqlite_store(path, str(path), must_exist=True, writable=False)
    except UserError:
        return False
    return True


class _MuteWhenStopping(logging.Filter):
    """Drops Ray's log records while the active guard is stopping the study: the runner says
    in one line why, and the trial errors a vanished store causes would only repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        g = _ACTIVE
        return g is None or not g.stopping()


_MUTE = _MuteWhenStopping()
_MUTED: list[Any] = []


def mute_ray_logs_when_stopping() -> None:
    """Put the filter on Ray's loggers and their handlers (again after ``ray.init``, which
    configures them)."""
    names = ["ray", *[n for n in logging.root.manager.loggerDict if n.startswith("ray")]]
    for name in names:
        lg = logging.getLogger(name)
        for obj in [lg, *lg.handlers]:
            if _MUTE not in obj.filters:
                obj.addFilter(_MUTE)
                _MUTED.append(obj)


def unmute_ray_logs() -> None:
    for obj in _MUTED:
        obj.removeFilter(_MUTE)
    _MUTED.clear()


def tune_stopper():
    """A Tune ``Stopper`` that stops every trial once the active guard says so."""
    from ray import tune

    class GuardStopper(tune.Stopper):
        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            g = active_guard()
            return g is not None and g.should_stop()

    return GuardStopper()
