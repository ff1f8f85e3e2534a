"""A workdir belongs to one driver at a time.

Two drivers on one workdir race MLflow's schema creation (``table ... already exists``) or, on
an existing store, compute every trial twice into the same runs and Tune folders. ``run`` and
``resume`` therefore hold an exclusive ``fcntl.flock`` on ``<workdir>/driver.lock`` for as long
as they run; the file holds the holder's pid, host, command and start time, so a second driver
says in one line who has the workdir instead of starting Ray or MLflow.

``report`` does not take the lock: it only reads MLflow (and writes its own report files and
summary run), which is safe beside a running study.

The lock dies with its process (a SIGKILLed driver leaves no stale lock; the file's text then
names a process that no longer holds it, which is why the text is only read when the lock is
taken). Python opens the lock file non-inheritable, so Ray's processes started by the driver
never hold it. On NFS the caveats of :mod:`nasrisk.trials.store` apply: locks work across
nodes only where the server supports locking.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from nasrisk.trials.errors import UserError

LOCK_FILE = "driver.lock"

# Workdirs this process holds, by resolved path -> [open lock file, depth]. flock belongs to an
# open file, so a second flock from the same process on a new descriptor would refuse its own
# holder: the CLI takes the lock before its store probes and run_study takes it again inside.
_HELD: dict[str, list[Any]] = {}


class WorkdirLock:
    """``with WorkdirLock(root):`` holds the workdir or raises :class:`UserError` naming the
    process that does."""

    def __init__(self, root: str | Path, command: str | None = None) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.command = command or " ".join(["nasrisk", *sys.argv[1:]])[:500]
        self._key: str | None = None

    def acquire(self) -> WorkdirLock:
        key = str(self.root.resolve())
        held = _HELD.get(key)
        if held is not None:  # this process holds it already (the CLI, then run_study)
            held[1] += 1
            self._key = key
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UserError(f"workdir {self.root} is in use by {holder(self.path)}; wait for "
                            "it to finish or stop it (one driver per workdir)") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "command": self.command, "started": time.time()}))
        f.flush()
        _HELD[key] = [f, 1]
        self._key = key
        return self

    def release(self) -> None:
        # the file stays: deleting it would let two processes hold 'the' lock on two inodes
        key, self._key = self._key, None
        held = _HELD.get(key) if key else None
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            fcntl.flock(held[0].fileno(), fcntl.LOCK_UN)
            held[0].close()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, in words (the holder writes right after locking, so a
    moment's wait covers a reader that came in between)."""
    for _ in range(10):
        try:
            info = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and "pid" in info:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
            return (f"pid {info['pid']} on {info.get('host', '?')} "
                    f"(`{info.get('command', '?')}`, since {since})")
        time.sleep(0.05)
    return f"another process (holding {path})"
