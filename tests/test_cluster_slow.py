"""The cluster set-up of cluster/README.md, for real, on 127.0.0.1 only.

Fast (not slow, no processes started):

* both cluster YAMLs pass Ray's own config preparation and validation (the jsonschema
  ``ray/autoscaler/ray-schema.json`` and the checks ``ray up`` runs before it contacts any
  machine or cloud), ship the auth token to every node and start Ray with token auth;
* every ``ray``/``mlflow``/``nasrisk`` command in cluster/README.md and in the YAMLs, and every
  option of ``cluster/mlflow-server.sh`` used there, exists in the pinned versions.

Slow (``pytest -m slow``):

* A tracking server started by ``cluster/mlflow-server.sh`` (SQLite backend, proxied
  artifacts, both in a temp folder): ``nasrisk run --tracking-uri http://...`` logs exactly one
  finished run per trial into it, creates the experiment with the server's proxied artifact
  root, and an artifact logged through the server lands in ``--artifacts-destination``.
* ``ray start --head`` with token authentication (a fresh token, never the user's
  ``~/.ray/auth_token``) and explicit ports, then ``ray job submit --working-dir`` of a study
  file: the job succeeds, its trials ran as actors of that cluster, and they logged to the
  tracking server; a client with the wrong token is refused.

Every process a test starts carries a marker in its environment (inherited by all its
descendants, including Ray's workers and job drivers, which Ray puts in sessions of their
own); teardown terminates whatever carries the marker and kills what outlives a grace
period. ``ray stop`` is not used: it kills every Ray process of the user on the machine,
other people's clusters included.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import click
import mlflow
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
SERVER_SCRIPT = CLUSTER / "mlflow-server.sh"
CLUSTER_YAMLS = sorted(CLUSTER.glob("*.yaml"))
# the venv's bin folder (not resolved: sys.executable may link to the base interpreter);
# it holds the `nasrisk`, `ray` and `mlflow` console scripts
BIN = Path(sys.executable).parent
MARKER = "NASRISK_CLUSTER_TEST"
N_TRIALS = 3


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (all held open until all are chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def base_env(tag: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_")) and k != "NASRISK_WORKDIR"}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", MARKER: tag,
                "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONUNBUFFERED": "1"})
    return env


def tagged_processes(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``MARKER=tag`` (Linux /proc)."""
    needle = f"{MARKER}={tag}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie is dead already; its parent reaps it
        except OSError:
            continue  # gone, or another user's: not ours either way
        out.append(int(entry.name))
    return out


def listening_hosts(tag: str) -> set[str]:
    """Addresses (hex, as in /proc/net/tcp*) of the TCP sockets in LISTEN state held by
    processes carrying this test's marker."""
    inodes = set()
    for pid in tagged_processes(tag):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                hosts.add(f[1].split(":")[0])
    return hosts


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_tagged(tag: str, grace: float = 60.0) -> None:
    """SIGTERM every process carrying this test's marker, give them ``grace`` seconds to shut
    down, then SIGKILL what is left."""
    signal_all(tagged_processes(tag), signal.SIGTERM)
    deadline = time.time() + grace
    while tagged_processes(tag) and time.time() < deadline:
        time.sleep(1)
    signal_all(tagged_processes(tag), signal.SIGKILL)
    deadline = time.time() + 30
    while tagged_processes(tag) and time.time() < deadline:
        time.sleep(0.5)
    assert not tagged_processes(tag), "processes of this test survived its teardown"


def stop(proc: subprocess.Popen, tag: str, grace: float = 60.0) -> None:
    """Stop the launched process (``ray start --block`` shuts its cluster down on SIGTERM) and
    everything else this test started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    stop_tagged(tag, grace)


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}\n"
                                 + log.read_text()[-4000:])
        if check():
            return time.time() - t0
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n"
                         + log.read_text()[-4000:])


def study_file(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"name": name, "default_profile": "smoke",
            "stages": [{"name": "probe", "kind": "calibrate",
                        "resources": {"cpu": 1, "gpu": 0},
                        "config": {"epochs": 2, "size": 16},
                        "grid": {"index": list(range(N_TRIALS))}}],
            "profiles": {"smoke": {}}}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def check_trial_runs(uri: str, study: str) -> mlflow.entities.Experiment:
    """Exactly one finished run per trial in the study's experiment, read over ``uri``."""
    c = mlflow.MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(study)
    assert exp is not None, f"no experiment {study} at {uri}"
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("nasrisk.role") == "trial"]
    assert len(runs) == N_TRIALS
    assert len({r.data.tags["nasrisk.trial_key"] for r in runs}) == N_TRIALS
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["nasrisk.status"] == "done"
        assert r.data.metrics["epochs_run"] == 2 and r.data.params["kind"] == "calibrate"
    assert sorted(int(r.data.params["index"]) for r in runs) == list(range(N_TRIALS))
    return exp


def run_cmd(args: list[str], env: dict[str, str], timeout: float,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------- fast: configs and docs


def cli_roots() -> dict[str, click.Command]:
    import typer
    from mlflow.cli import cli as mlflow_cli
    from ray.scripts.scripts import cli as ray_cli

    from nasrisk.study.cli import app

    script_opts = re.findall(r"^\s+(--[a-z-]+)(?:\|[^)]*)?\)", SERVER_SCRIPT.read_text(), re.M)
    script = click.Command("mlflow-server.sh", params=[click.Option([o]) for o in script_opts])
    return {"ray": ray_cli, "mlflow": mlflow_cli, "nasrisk": typer.main.get_command(app),
            "cluster/mlflow-server.sh": script, "bash": script}


def check_command(tokens: list[str], roots: dict[str, click.Command]) -> list[str]:
    """Resolve ``tokens`` (one shell command) in the CLIs of ``roots``; assert every
    subcommand and ``--option`` exists. Returns the commands checked (nested ones included:
    the entry point after ``--`` and quoted commands, e.g. of ``ray exec``)."""
    while tokens and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]) or tokens[0] == "nohup"):
        tokens = tokens[1:]  # VAR=value and nohup prefixes
    if tokens[:2] == ["bash", str(Path("~/nasrisk-cluster/mlflow-server.sh"))] or (
            tokens[:1] == ["bash"] and tokens[1:2] and tokens[1].endswith("mlflow-server.sh")):
        tokens = ["cluster/mlflow-server.sh", *tokens[2:]]
    if not tokens or tokens[0] not in roots:
        return []
    name, cmd, rest = tokens[0], roots[tokens[0]], tokens[1:]
    path = [name]
    # duck-typed: typer ships its own copy of click
    while hasattr(cmd, "get_command") and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(cmd.context_class(cmd), rest[0])
        assert sub is not None, f"`{' '.join(path)}` has no command {rest[0]!r}"
        path.append(rest[0])
        cmd, rest = sub, rest[1:]
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    checked = [" ".join(path)]
    for i, tok in enumerate(rest):
        if tok == "--":
            tail = rest[i + 1:]
            if name == "cluster/mlflow-server.sh":  # passed on to `mlflow server`
                tail = ["mlflow", "server", *tail]
            checked += check_command(tail, roots)
            break
        if tok.startswith("--"):
            assert tok.split("=")[0] in opts, f"`{' '.join(path)}` has no option {tok}"
        elif " " in tok:
            checked += check_command(shlex.split(tok), roots)
    return checked


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell snippet (continuations joined; split at ; & && || | and
    parentheses, quotes respected)."""
    out: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        cur: list[str] = []
        for tok in shlex.shlex(line, posix=True, punctuation_chars=True):
            if set(tok) <= set("()|&;"):
                out.append(cur)
                cur = []
            else:
                cur.append(tok)
        out.append(cur)
    return [c for c in out if c]


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_rays_validation(path):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    # what `ray up` does before contacting any machine: fill in the provider's defaults,
    # then validate against ray/autoscaler/ray-schema.json plus Ray's own consistency checks
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert "resources" in head and cfg["max_workers"] >= 1
    with pytest.raises(jsonschema.ValidationError):  # the validation is not vacuous
        validate_config({**cfg, "head_ips": ["10.0.0.1"]})
    # token auth: the token reaches every node at Ray's default path, every Ray start uses it
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    for c in starts:
        assert "RAY_AUTH_MODE=token" in c and "--port=6379" in c or "--address=" in c
    assert any("--head" in c for c in starts)
    # every command the nodes run exists with the options given
    roots = cli_roots()
    checked = []
    for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        for c in cfg[key]:
            for tokens in shell_commands(c):
                checked += check_command(tokens, roots)
    assert checked.count("ray start") == 2 and "ray stop" in checked
    assert "cluster/mlflow-server.sh" in checked


def test_readme_commands_exist():
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    roots = cli_roots()
    checked = [c for b in blocks for tokens in shell_commands(b)
               for c in check_command(tokens, roots)]
    for needed in ("ray up", "ray job submit", "ray get-auth-token", "ray exec",
                   "nasrisk run", "nasrisk resume", "nasrisk report",
                   "cluster/mlflow-server.sh", "ray start"):
        assert needed in checked, needed
    # inline `ray ...` commands in the prose, too
    for inline in re.findall(r"`((?:ray|nasrisk|mlflow) [^`]*)`", text):
        check_command(shlex.split(inline.replace("...", "")), roots)


def test_mlflow_server_script_rejects_unknown_options():
    ok = subprocess.run(["bash", str(SERVER_SCRIPT), "--help"], capture_output=True, text=True,
                        timeout=30)
    assert ok.returncode == 0 and "--artifacts-destination" in ok.stdout
    bad = subprocess.run(["bash", str(SERVER_SCRIPT), "--hots", "0.0.0.0"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "unknown option --hots" in bad.stderr
    missing = subprocess.run(["bash", str(SERVER_SCRIPT), "--port"], capture_output=True,
                             text=True, timeout=30)
    assert missing.returncode == 2 and "--port needs a value" in missing.stderr


# ---------------------------------------------------------------- slow: real servers


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The tracking server of cluster/mlflow-server.sh on a free 127.0.0.1 port:
    (tracking URI, folder holding its SQLite store and artifacts)."""
    home = tmp_path_factory.mktemp("mlflow-server")
    tag = f"mlflow-{secrets.token_hex(8)}"
    (port,) = free_ports(1)
    log = home / "server.log"
    args = ["bash", str(SERVER_SCRIPT), "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination", str(home / "artifacts")]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=base_env(tag), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    return r.status == 200
            except OSError:
                return False

        secs = wait_until(healthy, 300, "the MLflow server to answer", proc, log)
        print(f"mlflow server answered after {secs:.0f} s")
        hosts = listening_hosts(tag)
        assert hosts and hosts <= LOOPBACK, hosts  # --host 127.0.0.1: loopback only
        yield f"http://127.0.0.1:{port}", home
    finally:
        stop(proc, tag)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_study_logs_to_the_tracking_server(mlflow_server, tmp_path):
    uri, home = mlflow_server
    study = study_file(tmp_path / "spec", "server-probe")
    wd = tmp_path / "wd"
    tag = f"run-{secrets.token_hex(8)}"
    try:
        p = run_cmd(["nasrisk", "run", str(study), "--tracking-uri", uri, "--workdir", str(wd)],
                    base_env(tag), timeout=900, cwd=tmp_path)
    finally:
        stop_tagged(tag)  # e.g. the driver's local Ray, had the driver died
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"{N_TRIALS}/{N_TRIALS} done" in p.stdout
    assert f"MLflow store: {uri}" in p.stdout
    assert not (wd / "mlflow.db").exists()  # nothing fell back to a local store
    exp = check_trial_runs(uri, "server-probe")
    # the runner leaves the artifact location to the server: proxied artifacts
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    c = mlflow.MlflowClient(tracking_uri=uri)
    run = c.search_runs([exp.experiment_id], max_results=1)[0]
    note = tmp_path / "note.txt"
    note.write_text("via the server")
    c.log_artifact(run.info.run_id, str(note))
    stored = list((home / "artifacts").rglob("note.txt"))
    assert len(stored) == 1 and run.info.run_id in stored[0].parts
    assert stored[0].read_text() == "via the server"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ray_job_submit_with_token_auth(mlflow_server, tmp_path):
    uri, _ = mlflow_server
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
    tag = f"ray-{secrets.token_hex(8)}"
    # Ray's unix sockets live under the temp dir and must stay under ~107 characters
    temp = Path(tempfile.mkdtemp(prefix="nrr", dir="/tmp"))
    (gcs, dash, client_port, nm, om, agent_http, agent_grpc, renv, metrics) = free_ports(9)
    address = f"http://127.0.0.1:{dash}"
    env = base_env(tag) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    # On Linux `ray start` swaps 127.0.0.1 for the primary interface's address unless
    # multi-node mode is off; off, every Ray port binds to the loopback only.
    head_env = env | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    head_args = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                 "--port", str(gcs), "--include-dashboard", "true",
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                 "--ray-client-server-port", str(client_port), "--node-manager-port", str(nm),
                 "--object-manager-port", str(om), "--dashboard-agent-listen-port",
                 str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
                 "--runtime-env-agent-port", str(renv), "--metrics-export-port", str(metrics),
                 "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp),
                 "--disable-usage-stats"]
    log = tmp_path / "ray-head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(head_args, env=head_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        def jobs_api_up() -> bool:
            return run_cmd(["ray", "job", "list", "--address", address], env, 120).returncode == 0

        secs = wait_until(jobs_api_up, 300, "the Ray job API", head, log)
        print(f"ray head answered after {secs:.0f} s")
        hosts = listening_hosts(tag)
        assert hosts and hosts <= LOOPBACK, hosts  # every Ray port on the loopback only
        # token auth is on: a client holding another token is refused
        wrong = run_cmd(["ray", "job", "list", "--address", address],
                        env | {"RAY_AUTH_TOKEN": secrets.token_hex(32)}, 120)
        assert wrong.returncode != 0
        assert "Invalid authentication token" in wrong.stdout + wrong.stderr

        job_dir = tmp_path / "job"
        study_file(job_dir, "job-probe")
        wd = tmp_path / "wd"
        sub_id = f"nasrisk-test-{secrets.token_hex(4)}"
        t0 = time.time()
        p = run_cmd(["ray", "job", "submit", "--address", address, "--submission-id", sub_id,
                     "--working-dir", str(job_dir), "--",
                     "nasrisk", "run", "study.yaml", "--workdir", str(wd),
                     "--tracking-uri", uri], env, timeout=900)
        print(f"ray job submit took {time.time() - t0:.0f} s")
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-5000:]
        assert "succeeded" in out and f"{N_TRIALS}/{N_TRIALS} done" in out, out[-5000:]
        check_trial_runs(uri, "job-probe")
        # the trials ran as actors of this cluster (the job's driver joined it via RAY_ADDRESS
        # rather than starting a Ray of its own)
        actors = run_cmd(["ray", "list", "actors", "--address", address, "--format", "json",
                          "--limit", "1000", "--detail"], env, 180)
        assert actors.returncode == 0, actors.stderr[-3000:]
        listed = json.loads(actors.stdout)
        # Tune runs a function trainable in actors of class ImplicitFunc (reused across trials)
        trainables = [a for a in listed if a.get("class_name") == "ImplicitFunc"]
        supervisor = [a for a in listed if a.get("class_name") == "JobSupervisor"]
        assert 1 <= len(trainables) <= N_TRIALS, [a.get("class_name") for a in listed]
        assert len({a["job_id"] for a in trainables}) == 1   # one driver: the submitted job's
        assert len(supervisor) == 1
        # the workdir the job was given holds the Tune state (shared storage on a cluster)
        assert any((wd / "tune").iterdir())
    finally:
        try:
            stop(head, tag)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
