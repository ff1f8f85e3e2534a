"""Start-up probes: everything a study needs from outside the process is checked, with a short
timeout, before MLflow or Ray start, so a user's mistake is one line (exit 2), not a traceback
or a hang.

* :func:`check_tracking_uri` - the URI's scheme is one MLflow can use; a local SQLite store is
  a SQLite file (header, schema, ``PRAGMA quick_check``) in a folder that can be written; an
  HTTP server answers an HTTP request within :data:`PROBE_TIMEOUT_S`; a database server's port
  accepts a connection.
* :func:`check_ray_address` - ``--address`` / ``$RAY_ADDRESS`` is a Ray address and its port
  accepts a connection.
* :func:`check_trial_resources` - after Ray started: some alive node can hold one trial of a
  stage (else Tune would wait forever); a cluster may first get ``resource_timeout`` seconds
  to add one (autoscaling).
* :func:`sqlite_uri` / :func:`sqlite_path` - a path <-> an MLflow SQLite URI, quoting what
  SQLAlchemy would otherwise read as the URI's query (``?``) or an escape (``%``).

Each probe returns the seconds it took (``nasrisk run`` spends well under 0.1 s on them when
every service answers; a service that does not answer costs at most the timeout).

Deviations: MLflow creates the parent folder of a SQLite path *before* unquoting it, so a
workdir whose name holds ``?`` or ``%`` also gets an empty sibling folder with the quoted name
(the database itself is inside the workdir).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from nasrisk.trials.errors import UserError

PROBE_TIMEOUT_S = 2.5
#: quick_check reads every page: skip it on stores larger than this (header and schema are
#: still read)
QUICK_CHECK_MAX_BYTES = 256 * 2**20
SQLITE_MAGIC = b"SQLite format 3\x00"
DB_SCHEMES = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "databricks", *DB_SCHEMES)


def sqlite_uri(path: str | Path) -> str:
    """The MLflow / SQLAlchemy URI of the SQLite file ``path`` (made absolute). SQLAlchemy
    splits the URI at the first ``?`` and unquotes the database part, so ``%`` and ``?`` in
    the path are percent-encoded; nothing else needs it (``#`` and spaces pass as they are)."""
    return "sqlite:///" + str(Path(path).resolve()).replace("%", "%25").replace("?", "%3F")


def sqlite_path(uri: str) -> Path | None:
    """The file behind a ``sqlite:///`` URI (None for another scheme or an in-memory one),
    read as SQLAlchemy reads it."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:"):]
    if not rest.startswith("///"):
        return None
    db = rest[3:].split("?", 1)[0]
    return Path(unquote(db)) if db and db != ":memory:" else None


def _resolve(host: str, port: int, timeout: float) -> list[tuple[Any, ...]]:
    """getaddrinfo with a timeout (a resolver with no network can take tens of seconds)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["addrs"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"resolving {host} took more than {timeout:g} s")
    if "error" in out:
        raise out["error"]
    return out["addrs"]


def tcp_connect(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> socket.socket:
    """An open TCP connection to ``host:port`` within ``timeout`` seconds (OSError if not)."""
    last: OSError | None = None
    deadline = time.monotonic() + timeout
    for family, kind, proto, _, addr in _resolve(host, port, timeout):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        s = socket.socket(family, kind, proto)
        s.settimeout(left)
        try:
            s.connect(addr)
            return s
        except OSError as e:
            s.close()
            last = e
    raise last or TimeoutError(f"no answer within {timeout:g} s")


def _why(e: BaseException, timeout: float) -> str:
    if isinstance(e, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host name ({e.strerror or e})"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _proxy_for(scheme: str, host: str) -> tuple[str, int] | None:
    """The HTTP proxy MLflow's requests would go through for ``host``, if any."""
    import urllib.request

    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return (p.hostname, p.port or 80) if p.hostname else None


def probe_http(uri: str, what: str, timeout: float = PROBE_TIMEOUT_S) -> float:
    """``uri`` (http or https) answers within ``timeout``: for http, a request for
    ``/health`` must get an HTTP status line back (any status: the server exists); for https,
    the port must accept a connection (the TLS handshake is left to MLflow)."""
    t0 = time.perf_counter()
    try:
        u = urlsplit(uri)
        port = u.port or (443 if u.scheme == "https" else 80)
    except ValueError as e:
        raise UserError(f"{what} {uri!r} is not a valid URL ({e})") from None
    if not u.hostname:
        raise UserError(f"{what} {uri!r} names no host (http://HOST:PORT)")
    target = (u.hostname, port)
    proxy = _proxy_for(u.scheme, u.hostname)
    via = f" through the proxy {proxy[0]}:{proxy[1]}" if proxy else ""
    try:
        with tcp_connect(*(proxy or target), timeout=timeout) as s:
            if u.scheme == "http":
                s.settimeout(max(0.1, timeout - (time.perf_counter() - t0)))
                path = uri if proxy else "/health"
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: {u.hostname}:{port}\r\n\r\n".encode())
                head = s.recv(16)
                # read the (small) reply to its end, so the server does not log a reset
                got, end = len(head), time.perf_counter() + 0.5
                while got < 65536 and time.perf_counter() < end:
                    s.settimeout(max(0.05, end - time.perf_counter()))
                    try:
                        chunk = s.recv(4096)
                    except TimeoutError:
                        break
                    if not chunk:
                        break
                    got += len(chunk)
                if not head.startswith(b"HTTP/"):
                    raise UserError(f"{what} {uri} answered{via}, but not over HTTP "
                                    f"(first bytes {head[:8]!r}); is that the right port?")
    except UserError:
        raise
    except (OSError, TimeoutError) as e:
        raise UserError(f"{what} {uri} did not answer{via}: {_why(e, timeout)}") from None
    return time.perf_counter() - t0


def check_sqlite_store(path: Path, uri: str, *, must_exist: bool = False,
                       writable: bool = True) -> None:
    """A SQLite MLflow store that MLflow can open: a file (or nothing yet, in a folder that
    can be written) whose header, schema and pages are sound."""
    shown = f"MLflow store {path}"
    hint = "move it away (a new run creates a fresh one) or pass --tracking-uri"
    if not path.exists():
        if must_exist:
            raise UserError(f"no MLflow store at {uri}; run the study first or pass "
                            "--tracking-uri")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot create {shown}: {parent} is not a folder this user can "
                            "write")
        return
    if path.is_dir():
        raise UserError(f"{shown} is a directory, not a SQLite file; {hint}")
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"cannot read {shown}: {e.strerror or e}") from None
    if size == 0:
        return  # an empty file is an empty database: MLflow creates its tables
    if head != SQLITE_MAGIC:
        raise UserError(f"{shown} is not a SQLite database (it starts with {head[:8]!r}); "
                        f"{hint}")
    if writable and not os.access(path, os.W_OK):
        raise UserError(f"{shown} is read-only for this user; make it writable or pass "
                        "--tracking-uri")
    try:
        # a hot journal (a writer stopped mid-transaction, e.g. the folder turned read-only)
        # is rolled back by SQLite on the first read, which a read-only connection cannot do
        hot = writable and path.with_name(path.name + "-journal").exists()
        mode = "rw" if hot else "ro"
        con = sqlite3.connect(f"file:{quote(str(path))}?mode={mode}", uri=True, timeout=10)
        try:
            tables = {r[0] for r in con.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if size <= QUICK_CHECK_MAX_BYTES:
                rows = con.execute("PRAGMA quick_check(1)").fetchall()
                if rows != [("ok",)]:
                    raise sqlite3.DatabaseError(str(rows[0][0]) if rows else "quick_check failed")
        finally:
            con.close()
    except sqlite3.Error as e:
        raise UserError(f"{shown} is corrupt ({str(e).splitlines()[0]}); {hint}") from None
    if tables and not tables & {"experiments", "alembic_version"}:
        raise UserError(f"{shown} is a SQLite database but not an MLflow store (tables: "
                        f"{', '.join(sorted(tables)[:4])}); {hint}")


def check_tracking_uri(uri: str, *, must_exist: bool = False, writable: bool = True,
                       timeout: float = PROBE_TIMEOUT_S) -> float:
    """Refuse a tracking URI MLflow cannot use, in one line; returns the seconds it took.
    ``must_exist``: a local store must already be there (``report``, ``plan``)."""
    t0 = time.perf_counter()
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    base = scheme.split("+", 1)[0]
    if "://" not in uri and not uri.startswith("databricks") or base not in TRACKING_SCHEMES:
        raise UserError(f"tracking URI {uri!r} is not one MLflow can use: give "
                        "http(s)://HOST:PORT, sqlite:///PATH, file:///PATH, databricks or "
                        "postgresql|mysql|mssql://...")
    if base == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            raise UserError(f"tracking URI {uri!r} names no SQLite file (sqlite:///PATH)")
        check_sqlite_store(path, uri, must_exist=must_exist, writable=writable)
    elif base == "file":
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() not in ("true", "1"):
            # MLflow 3 refuses its file store with a traceback unless the user opts in
            raise UserError(f"tracking URI {uri}: MLflow's file store is in maintenance mode "
                            "and refused by default; use sqlite:///PATH (or set "
                            "MLFLOW_ALLOW_FILE_STORE=true to keep the file store)")
        p = Path(unquote(urlsplit(uri).path))
        if p.exists() and not p.is_dir():
            raise UserError(f"tracking URI {uri}: {p} is not a folder")
        if must_exist and not p.is_dir():
            raise UserError(f"no MLflow store at {uri}; run the study first or pass "
                            "--tracking-uri")
    elif base in ("http", "https"):
        probe_http(uri, "MLflow tracking server", timeout)
    elif base in DB_SCHEMES:
        try:
            u = urlsplit(uri)
            host, port = u.hostname, u.port or DB_SCHEMES[base]
        except ValueError as e:
            raise UserError(f"tracking URI {uri!r} is not a valid URL ({e})") from None
        if host:
            try:
                tcp_connect(host, port, timeout).close()
            except (OSError, TimeoutError) as e:
                raise UserError(f"the {base} server of tracking URI {uri} did not answer at "
                                f"{host}:{port}: {_why(e, timeout)}") from None
    return time.perf_counter() - t0


def _host_port(addr: str, default: int | None) -> tuple[str, int]:
    if addr.startswith("["):  # [ipv6]:port
        host, _, rest = addr[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_s = addr.rpartition(":") if ":" in addr else (addr, "", "")
    if not port_s and default is not None:
        port_s = str(default)
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536 or any(
            c.isspace() or c in "/?#@" for c in host):
        raise ValueError(addr)
    return host, int(port_s)


def effective_ray_address(address: str | None) -> str | None:
    """What ``ray.init`` will connect to: ``$RAY_ADDRESS`` wins over ``address`` (Ray's own
    rule, ray/_private/services.py get_ray_address_from_environment)."""
    return os.environ.get("RAY_ADDRESS") or address or None


def check_ray_address(address: str | None, timeout: float = PROBE_TIMEOUT_S) -> float:
    """Refuse a Ray address that is malformed or whose port does not accept a connection
    within ``timeout``; returns the seconds it took. None / ``local``: a local instance."""
    t0 = time.perf_counter()
    addr = effective_ray_address(address)
    if addr is None or addr == "local":
        return 0.0
    src = "$RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "--address"
    form = ("HOST:PORT (the head's GCS port, 6379 by default), ray://HOST:PORT (Ray Client, "
            "10001), auto or local")
    if addr.startswith(("http://", "https://")):
        raise UserError(f"{src} {addr}: that is a dashboard / job-submission address (for "
                        f"`ray job submit`); nasrisk connects with {form}")
    if addr == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as e:
            raise UserError(f"{src} auto: no running Ray instance found on this machine "
                            f"({str(e).splitlines()[0]}); start one with `ray start --head` "
                            "or leave --address out for a local instance") from None
        if found is None:
            return time.perf_counter() - t0
        addr = found
    client = addr.startswith("ray://")
    try:
        host, port = _host_port(addr[len("ray://"):] if client else addr,
                                10001 if client else None)
    except ValueError:
        raise UserError(f"{src} {addr!r} is not a Ray address; give {form}") from None
    try:
        tcp_connect(host, port, timeout).close()
    except (OSError, TimeoutError) as e:
        what = "Ray Client server" if client else "Ray head (GCS)"
        raise UserError(f"{src} {addr}: the {what} at {host}:{port} did not answer: "
                        f"{_why(e, timeout)}") from None
    return time.perf_counter() - t0


def _fits(node: dict[str, Any], need: dict[str, float]) -> bool:
    have = node.get("Resources", {})
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def check_trial_resources(stage: Any, options: Any, address: str | None) -> float:
    """After Ray started: refuse (UserError) when no alive node can hold one trial of
    ``stage`` (a :class:`~nasrisk.study.plan.StagePlan`), since Tune would wait forever.

    A local instance cannot grow, so it is refused at once; a cluster (``address`` or
    ``$RAY_ADDRESS``) may be autoscaling and gets ``options.resource_timeout`` seconds
    (default 600 for a cluster, 0 for a local instance) to add a node. Returns the seconds
    spent."""
    import ray

    t0 = time.perf_counter()
    need = {k: v for k, v in (("CPU", stage.resources.cpu), ("GPU", stage.resources.gpu))
            if v > 0}
    cluster = effective_ray_address(address) not in (None, "local")
    timeout = options.resource_timeout
    if timeout is None:
        timeout = 600.0 if cluster else 0.0
    deadline = time.monotonic() + timeout
    said = False
    while True:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if any(_fits(n, need) for n in nodes):
            return time.perf_counter() - t0
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not said:
            print(f"[{stage.spec.name}] no node of the Ray cluster can hold one trial "
                  f"({_fmt(need)}) yet; waiting up to {timeout:g} s for one "
                  "(--resource-timeout)", file=sys.stderr, flush=True)
            said = True
        time.sleep(min(5.0, left))
    biggest = {k: max((n.get("Resources", {}).get(k, 0.0) for n in nodes), default=0.0)
               for k in ("CPU", "GPU")}
    total = ray.cluster_resources()
    waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
    how = ("; pass --resource-timeout SECONDS to wait for an autoscaling cluster to add one"
           if cluster and timeout == 0 else "")
    raise UserError(
        f"stage {stage.spec.name}: one trial needs {_fmt(need)}, but no node of the Ray "
        f"cluster has that{waited} (largest node: {_fmt(biggest)}; whole cluster: "
        f"{_fmt({k: total.get(k, 0.0) for k in ('CPU', 'GPU')})}); lower --cpus-per-trial / "
        f"--gpus-per-trial or the stage's resources{how}")


def local_resources() -> dict[str, float]:
    """What a local Ray instance started by nasrisk gets: every CPU Ray counts here (cgroup
    limits included) and every visible CUDA device."""
    try:
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001 - Ray's private helper moved: count the CPUs ourselves
        cpus = float(os.cpu_count() or 1)
    import torch

    return {"CPU": cpus, "GPU": float(torch.cuda.device_count())}


def check_local_resources(stages: list[Any], address: str | None) -> None:
    """Before Ray starts: when nasrisk will start a local instance, refuse a stage whose one
    trial needs more CPUs or GPUs than this machine has (Tune would wait forever)."""
    if effective_ray_address(address) not in (None, "local"):
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return  # an instance already runs in this process: checked after connecting
    have = local_resources()
    for st in stages:
        need = {"CPU": st.resources.cpu, "GPU": st.resources.gpu}
        runs_trials = bool(st.trials) or getattr(st, "derived", None) is not None
        if runs_trials and any(v > have[k] + 1e-9 for k, v in need.items()):
            raise UserError(f"stage {st.spec.name}: one trial needs {_fmt(need)}, but this "
                            f"machine has {_fmt(have)} (the local Ray instance gets all of "
                            "it); lower --cpus-per-trial / --gpus-per-trial or the stage's "
                            "resources, or pass --address of a cluster")


def _fmt(res: dict[str, float]) -> str:
    return " + ".join(f"{res.get(k, 0.0):g} {k}" for k in ("CPU", "GPU"))
