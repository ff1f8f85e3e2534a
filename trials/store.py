"""A content-addressed store of trained victims (PROTOCOLS 4 "Train each victim once").

Layout under ``root`` (one flat folder, shared by every trial of a study):

* ``<key>.pt``   ``torch.save({"state_dict": ..., "record": ...})``, written to a temporary
  file in the same folder and renamed into place (a reader never sees half a file);
* ``<key>.json`` the commit marker, written (atomically) *after* the weights: the weights
  file's byte size and SHA-256, the format version and the record in plain JSON (for humans);
* ``<key>.lock`` an empty file that :meth:`VictimStore.lock` holds an ``fcntl.flock`` on.

A ``.pt`` without its ``.json`` (a writer died between the two renames), a size or checksum
mismatch (truncated, bit-flipped, or replaced file), something that is not a regular file (a
folder in its place) or a file ``torch.load(weights_only=True)`` rejects is *corrupt*: :meth:`VictimStore.load` reports why, deletes the entry and returns None,
so the caller retrains; a corrupt file is never used.

Writers must hold :meth:`VictimStore.lock` for the key around load-check-train-save (as
:func:`nasrisk.trials.victims.ensure_victim` does), so two trials never train the same victim
and a reader never deletes an entry a writer is halfway through committing.

Locking caveat: ``flock`` excludes processes on one node (and threads in one process that
open the lock separately). On NFS, Linux emulates ``flock`` with POSIX byte-range locks
(since 2.6.12), which work across nodes only when the server supports locking (NFSv4, or
NFSv3 with ``lockd``; mounts with ``nolock`` or ``local_lock=all`` lock per node only), and
which do not exclude two threads of one process. On storage without lock support two nodes
may both train a victim: the result is still correct (same key, same weights up to
nondeterminism; the later atomic save wins), only the work is duplicated. Locks die with
their process, so a killed trial never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

Reporter = Callable[[str], None]


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class VictimStore:
    """Trained victims by key (see the module docstring for layout, atomicity and locking)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- paths ------------------------------------------------------------------------------
    def _check(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"store keys are letters, digits, '_', '.', '-'; got {key!r}")
        return key

    def path(self, key: str) -> Path:
        """The weights file of ``key`` (it may not exist)."""
        return self.root / f"{self._check(key)}.pt"

    def meta_path(self, key: str) -> Path:
        """The commit marker of ``key``: size, SHA-256 and record of the weights file."""
        return self.root / f"{self._check(key)}.json"

    def __contains__(self, key: str) -> bool:
        return self.meta_path(key).is_file() and self.path(key).is_file()

    def keys(self) -> list[str]:
        """Keys with a committed entry (not verified; :meth:`load` verifies)."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json") if p.with_suffix(".pt").is_file())

    # -- reading ----------------------------------------------------------------------------
    def load(self, key: str, *, report: Reporter | None = None) -> dict[str, Any] | None:
        """``{"state_dict": ..., "record": ...}`` of ``key``, or None when absent or corrupt.

        A corrupt entry (see the module docstring) is reported through ``report`` (default:
        a ``RuntimeWarning``) with the reason, deleted, and None is returned. Call it holding
        :meth:`lock` when a writer may be active.
        """
        report = report or _warn
        pt, meta_file = self.path(key), self.meta_path(key)
        if not pt.exists() and not meta_file.exists() and not pt.is_symlink():
            return None
        problem = self._problem(pt, meta_file)
        obj: dict[str, Any] | None = None
        if problem is None:
            try:
                obj = torch.load(pt, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is corrupt
                problem = f"torch.load failed: {type(e).__name__}: {e}"
            else:
                if not (isinstance(obj, dict) and "state_dict" in obj and "record" in obj):
                    problem = "the file does not hold a state_dict and a record"
        if problem is not None:
            report(f"victim store: entry {key} in {self.root} is corrupt ({problem}); "
                   "deleting it so it is retrained")
            self.delete(key)
            return None
        return obj

    def _problem(self, pt: Path, meta_file: Path) -> str | None:
        try:
            return self._check_files(pt, meta_file)
        except OSError as e:  # unreadable, or not a regular file after all
            return f"cannot read it ({type(e).__name__}: {e.strerror or e})"

    def _check_files(self, pt: Path, meta_file: Path) -> str | None:
        for p in (pt, meta_file):
            if p.exists() and not p.is_file():
                return f"{p.name} is not a regular file"
        if not pt.exists():
            return f"{meta_file.name} exists but {pt.name} is missing"
        if not meta_file.exists():
            return f"{pt.name} has no {meta_file.name} (the writer died before committing)"
        try:
            meta = json.loads(meta_file.read_text())
            size, digest = int(meta["size"]), str(meta["sha256"])
        except (ValueError, KeyError, TypeError) as e:
            return f"unreadable {meta_file.name}: {e}"
        if meta.get("format") != FORMAT:
            return f"format {meta.get('format')!r}, this code reads {FORMAT}"
        actual = pt.stat().st_size
        if actual != size:
            return f"{pt.name} has {actual} bytes, {size} were written"
        if sha256_file(pt) != digest:
            return f"{pt.name} does not match its SHA-256"
        return None

    def record(self, key: str) -> dict[str, Any] | None:
        """The record of a committed entry from its JSON marker (cheap; not verified)."""
        try:
            return json.loads(self.meta_path(key).read_text())["record"]
        except (OSError, ValueError, KeyError):
            return None

    # -- writing ----------------------------------------------------------------------------
    def save(self, key: str, state_dict: dict[str, torch.Tensor], record: dict[str, Any]) -> Path:
        """Write ``key``: weights (atomic rename), then the JSON marker (atomic rename) that
        commits them. ``record`` must be JSON-serialisable (numbers, strings, lists, dicts).
        Hold :meth:`lock` for ``key`` while calling this."""
        pt, meta_file = self.path(key), self.meta_path(key)
        json.dumps(record)  # fail before writing anything
        self.root.mkdir(parents=True, exist_ok=True)
        meta_file.unlink(missing_ok=True)  # uncommit an old entry before replacing its weights
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        _write_atomic(pt, lambda tmp: torch.save({"state_dict": state, "record": record}, tmp))
        meta = {"format": FORMAT, "key": key, "size": pt.stat().st_size,
                "sha256": sha256_file(pt), "record": record}
        _write_atomic(meta_file, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
        return pt

    def delete(self, key: str) -> None:
        """Remove ``key``'s marker, then its weights (the lock file stays: deleting it would
        let two processes hold 'the' lock on different inodes)."""
        for p in (self.meta_path(key), self.path(key)):
            if p.is_dir() and not p.is_symlink():  # something put a folder in its place
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    # -- locking ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str, *, on_wait: Reporter | None = None) -> Iterator[None]:
        """Hold an exclusive ``fcntl.flock`` on ``<key>.lock`` (blocking). If another process
        holds it, ``on_wait`` gets a message first. See the module docstring for NFS."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{self._check(key)}.lock"
        with open(path, "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait(f"victim store: waiting for another process holding {path}")
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
