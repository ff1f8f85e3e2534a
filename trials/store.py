"""A content-addressed store of trained models and other objects (PROTOCOLS 4 "Train each
victim once"): models by lineage key (:mod:`nasrisk.trials.lineage`), objects (a poison set, a
trigger generator, a search state) by the hash of their kind and identity
(:func:`ensure_object`).

Layout under ``root`` (one flat folder, shared by every trial of every study of a workdir):

* ``<key>.pt``   ``torch.save({"state_dict": ..., "record": ...})`` for a model, or
  ``torch.save({"payload": ..., "record": ...})`` for an object, written to a temporary file
  in the same folder and renamed into place (a reader never sees half a file);
* ``<key>.json`` the commit marker, written (atomically) *after* the weights: the weights
  file's byte size and SHA-256, the format version, the entry's kind (``model`` or the
  object's kind) and the record in plain JSON (for humans and ``nasrisk store ls``);
* ``<key>.lock`` an empty file that :meth:`Store.lock` holds an ``fcntl.flock`` on.

A ``.pt`` without its ``.json`` (a writer died between the two renames), a size or checksum
mismatch (truncated, bit-flipped, or replaced file), something that is not a regular file (a
folder in its place) or a file ``torch.load(weights_only=True)`` rejects is *corrupt*:
:meth:`Store.load` reports why, deletes the entry and returns None, so the caller retrains
(recomputes); a corrupt file is never used. :meth:`Store.problem` says the same without
deleting anything (``nasrisk store verify``).

Writers must hold :meth:`Store.lock` for the key around load-check-train-save (as
:func:`nasrisk.trials.victims.ensure_victim` and :func:`ensure_object` do), so two trials never
make the same entry and a reader never deletes an entry a writer is halfway through
committing. A writer that needs a second entry while holding a lock (a child model needs its
parent) takes the locks in lineage order, child first, never the reverse: no deadlock.

Locking caveat: ``flock`` excludes processes on one node (and threads in one process that
open the lock separately). On NFS, Linux emulates ``flock`` with POSIX byte-range locks
(since 2.6.12), which work across nodes only when the server supports locking (NFSv4, or
NFSv3 with ``lockd``; mounts with ``nolock`` or ``local_lock=all`` lock per node only), and
which do not exclude two threads of one process. On storage without lock support two nodes
may both train a model: the result is still correct (same key, same weights up to
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
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .context import TrialContext

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


class Store:
    """Stored models and objects by key (see the module docstring for layout, atomicity and
    locking)."""

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

    def all_keys(self) -> list[str]:
        """Every key with a ``.pt`` or a ``.json`` (committed or not; what ``verify`` checks)."""
        if not self.root.is_dir():
            return []
        return sorted({p.stem for p in self.root.iterdir()
                       if p.suffix in (".pt", ".json") and not p.name.startswith(".")})

    # -- reading ----------------------------------------------------------------------------
    def load(self, key: str, *, report: Reporter | None = None) -> dict[str, Any] | None:
        """``{"state_dict" | "payload": ..., "record": ...}`` of ``key``, or None when absent
        or corrupt.

        A corrupt entry (see the module docstring) is reported through ``report`` (default:
        a ``RuntimeWarning``) with the reason, deleted, and None is returned. Call it holding
        :meth:`lock` when a writer may be active.
        """
        report = report or _warn
        pt, meta_file = self.path(key), self.meta_path(key)
        if not pt.exists() and not meta_file.exists() and not pt.is_symlink():
            return None
        obj, problem = self._read(key)
        if problem is not None:
            report(f"store: entry {key} in {self.root} is corrupt ({problem}); "
                   "deleting it so it is made again")
            self.delete(key)
            return None
        return obj

    def problem(self, key: str) -> str | None:
        """Why the entry ``key`` is corrupt (size, SHA-256, a weights-only load), or None when
        it is good. Deletes nothing."""
        return self._read(key)[1]

    def _read(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        pt, meta_file = self.path(key), self.meta_path(key)
        problem = self._problem(pt, meta_file)
        if problem is not None:
            return None, problem
        try:
            obj = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is corrupt
            first = (str(e).splitlines() or [""])[0][:200]
            return None, f"torch.load failed: {type(e).__name__}: {first}"
        if not (isinstance(obj, dict) and "record" in obj
                and ("state_dict" in obj or "payload" in obj)):
            return None, "the file does not hold a state_dict (or payload) and a record"
        return obj, None

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

    def meta(self, key: str) -> dict[str, Any] | None:
        """The JSON marker of a committed entry: ``format``, ``key``, ``kind``, ``size``,
        ``sha256``, ``record`` (cheap; not verified)."""
        try:
            meta = json.loads(self.meta_path(key).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def record(self, key: str) -> dict[str, Any] | None:
        """The record of a committed entry from its JSON marker (cheap; not verified)."""
        meta = self.meta(key)
        record = meta.get("record") if meta else None
        return record if isinstance(record, dict) else None

    def sha256(self, key: str) -> str | None:
        """The SHA-256 of ``key``'s weights file as committed (verified by :meth:`load`)."""
        meta = self.meta(key)
        return str(meta["sha256"]) if meta and "sha256" in meta else None

    # -- writing ----------------------------------------------------------------------------
    def save(self, key: str, state_dict: Mapping[str, torch.Tensor],
             record: dict[str, Any]) -> Path:
        """Write the model ``key``: weights (atomic rename), then the JSON marker (atomic
        rename) that commits them. ``record`` must be JSON-serialisable (numbers, strings,
        lists, dicts). Hold :meth:`lock` for ``key`` while calling this."""
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        return self._save(key, {"state_dict": state, "record": record},
                          str(record.get("kind", "model")))

    def save_object(self, key: str, payload: Any, record: dict[str, Any], *, kind: str) -> Path:
        """Write the object ``key`` (``payload``: tensors, numbers, strings, lists, dicts, what
        a weights-only load accepts) like :meth:`save`. Hold :meth:`lock` for ``key``."""
        check_payload(payload)
        return self._save(key, {"payload": _cpu(payload), "record": record}, kind)

    def _save(self, key: str, obj: dict[str, Any], kind: str) -> Path:
        pt, meta_file = self.path(key), self.meta_path(key)
        json.dumps(obj["record"])  # fail before writing anything
        self.root.mkdir(parents=True, exist_ok=True)
        meta_file.unlink(missing_ok=True)  # uncommit an old entry before replacing its weights
        _write_atomic(pt, lambda tmp: torch.save(obj, tmp))
        meta = {"format": FORMAT, "key": key, "kind": kind, "size": pt.stat().st_size,
                "sha256": sha256_file(pt), "record": obj["record"]}
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
                    on_wait(f"store: waiting for another process holding {path}")
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


#: the name the store had when it held victims only
VictimStore = Store


# -- objects ----------------------------------------------------------------------------------
def check_payload(obj: Any, where: str = "payload") -> None:
    """TypeError unless ``obj`` is made of tensors, numbers, strings, None, lists, tuples and
    dicts with string keys: what ``torch.load(weights_only=True)`` reads back."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_payload(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be strings, got {k!r}")
            check_payload(v, f"{where}.{k}")
        return
    raise TypeError(f"{where}: a stored object holds tensors, numbers, strings, lists and "
                    f"dicts; got {type(obj).__name__}")


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    return obj


def object_key(kind: str, identity: Mapping[str, Any]) -> str:
    """First 16 hex chars of the SHA-256 of ``{"kind", "identity"}`` as canonical JSON."""
    blob = json.dumps({"kind": kind, "identity": identity}, sort_keys=True,
                      separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_object(store_root: str | Path | None, identity: Mapping[str, Any], kind: str,
                  compute: Callable[[], Any], ctx: TrialContext, *,
                  describe: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The stored object of ``kind`` (``"poison_set"``, ``"generator"``, ``"search_state"``,
    ...) and ``identity`` (everything that determines it, JSON-able), computing it with
    ``compute()`` and storing it when absent: ``(payload, record)``; ``record["source"]`` is
    ``"store"`` or ``"computed"``.

    The same guarantees as models (module docstring): under the key's lock, so concurrent
    callers compute it once; a corrupt entry is reported through ``ctx.warn``, deleted and
    recomputed; the payload is read back with a weights-only load. The entry gets one MLflow
    run through ``ctx.model_run`` (none outside the runner); ``describe`` names it in
    ``nasrisk store ls``. With ``store_root`` None it is computed and not stored.
    """
    if not kind or not _KEY.match(kind):
        raise ValueError(f"object kinds are letters, digits, '_', '.', '-'; got {kind!r}")
    identity = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))
    key = object_key(kind, identity)
    text = describe or f"{kind} " + ", ".join(f"{k}={v}" for k, v in identity.items())
    if store_root is None:
        return compute(), {"kind": kind, "key": key, "identity": identity, "describe": text,
                           "source": "computed"}
    store = Store(store_root)
    with store.lock(key, on_wait=ctx.progress):
        found = store.load(key, report=ctx.warn)
        if found is not None and "payload" in found:
            ctx.progress(f"{kind} {key}: loaded from the store")
            return found["payload"], {**found["record"], "source": "store"}
        if found is not None:  # a model under an object's key: not what was asked for
            ctx.warn(f"store: entry {key} is not a {kind}; making it again")
        t0 = time.perf_counter()
        payload = compute()
        check_payload(payload)
        seconds = time.perf_counter() - t0
        run_id = ctx.model_run(key, name=text[:200], parent_key="", step_kind=kind,
                               params={"identity": identity}, metrics={"seconds": seconds})
        record = {"kind": kind, "key": key, "identity": identity, "describe": text,
                  "run_id": run_id, "seconds": seconds, "made_at": time.time()}
        store.save_object(key, payload, record, kind=kind)
        ctx.progress(f"{kind} {key}: stored")
    return payload, {**record, "source": "computed"}
