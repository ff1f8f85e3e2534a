"""Issue 13 section 2: every input a user can type or break ends in exit 2 and one line
``nasrisk: error: ...`` naming the bad field or file: no traceback, no hang, and no MLflow or
Ray log line before it. Grouped as the issue lists them: study files, their structure,
numbers, command-line options, service probes, workdirs, stores and datasets, run records."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from checks import one_line_error

CAL = {
    "name": "cal", "default_profile": "smoke",
    "stages": [{"name": "probe", "kind": "calibrate", "config": {"epochs": 1, "size": 4},
                "grid": {"index": [0, 1]}}],
    "profiles": {"smoke": {}, "big": {"config": {"epochs": 2}}},
}
ARCH = "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"
EVAS = {
    "name": "ev", "default_profile": "smoke",
    "stages": [{"name": "evas", "kind": "evas",
                "config": {"C": 4, "N": 1, "train": {"epochs": 1}}, "grid": {"arch": [ARCH]}}],
    "profiles": {"smoke": {"dataset": "embedded"}},
}
VICTIM = {
    "name": "vic", "default_profile": "smoke",
    "stages": [{"name": "victims", "kind": "victim",
                "config": {"model": "darts", "model_kwargs": {"C": 8, "layers": 2},
                           "dataset": "embedded", "train": {"epochs": 1}}}],
    "profiles": {"smoke": {}},
}

BOMB = """\
name: cal
default_profile: smoke
stages:
  - name: probe
    kind: calibrate
    config: {epochs: 1}
profiles:
  smoke: {}
  unused:
    description: a 1 KB billion-laughs in a profile nobody runs
    config:
      x0: &a0 [l, l, l, l, l, l, l, l, l]
      x1: &a1 [*a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0]
      x2: &a2 [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1]
      x3: &a3 [*a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2]
      x4: &a4 [*a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3]
      x5: &a5 [*a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4]
      x6: &a6 [*a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5]
      x7: &a7 [*a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6]
      x8: &a8 [*a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7]
"""


def study_file(tmp_path: Path, base: dict, change=None, name: str = "study.yaml") -> str:
    d = copy.deepcopy(base)
    if change:
        change(d)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return str(p)


# -- study files: decoding and YAML -------------------------------------------------------

def _write(tmp_path: Path, data: bytes) -> str:
    p = tmp_path / "study.yaml"
    p.write_bytes(data)
    return str(p)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content,needle", [
    (b"\xff\xfe\x00\x01binary\x00", "not UTF-8"),
    ("name: caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    (BOMB.encode(), "alias bomb"),
    (b"name: cal\nstages:\n  - name: probe\n    kind: calibrate\n    config:\n"
     b"      epochs: 1\n      epochs: 3\nprofiles: {smoke: {}}\n", "duplicate key 'epochs'"),
    (("name: cal\nx: " + "[" * 200 + "]" * 200 + "\n").encode(), "nested more than"),
    (b"name: cal\nstages: &s [*s]\nprofiles: {smoke: {}}\n", "recursive"),
], ids=["binary", "latin-1", "alias-bomb-in-unused-profile", "duplicate-key", "deep", "recursive"])
def test_study_file_contents(run_cli, tmp_path, content, needle):
    path = _write(tmp_path, content)
    t0 = time.perf_counter()
    code, _, err = run_cli("plan", path, "--workdir", str(tmp_path / "wd"))
    one_line_error(code, err, needle, "study.yaml")
    assert time.perf_counter() - t0 < 30


@pytest.mark.timeout(60)
def test_study_file_that_cannot_be_read(run_cli, tmp_path):
    d = tmp_path / "dir.yaml"
    d.mkdir()
    code, _, err = run_cli("plan", str(d))
    one_line_error(code, err, "dir.yaml", "not a file")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # opening it would block forever
    code, _, err = run_cli("plan", str(fifo))
    one_line_error(code, err, "fifo.yaml", "not a file")


# -- study files: structure ---------------------------------------------------------------

def _profile_stage(d: dict, **over) -> None:
    d["profiles"]["smoke"]["stages"] = {"probe": over}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change,needles", [
    (lambda d: _profile_stage(d, resources="lots"), ["profiles.smoke.stages.probe.resources"]),
    (lambda d: _profile_stage(d, grid="abc"), ["profiles.smoke.stages.probe.grid"]),
    (lambda d: _profile_stage(d, grid={"index": "abc"}), ["profiles.smoke.stages.probe.grid"]),
    (lambda d: d["stages"][0]["grid"].update({"size.x": [1]}), ["grid.size.x", "size"]),
    (lambda d: d["stages"][0]["grid"].update({"index.x": [1]}), ["'index'", "'index.x'"]),
    (lambda d: d.update(report="nope"), ["report", "unknown report 'nope'"]),
    (lambda d: d["profiles"]["big"]["config"].update(epochs=-1), ["profile big", "epochs"]),
    (lambda d: d["profiles"]["big"]["config"].update(size="huge"), ["profile big", "size"]),
], ids=["profile-resources-str", "profile-grid-str",
        "profile-grid-value-str", "dotted-key-into-scalar",
        "overlapping-grid-keys", "unknown-report", "unused-profile-epochs",
        "unused-profile-size"])
def test_study_structure(run_cli, tmp_path, change, needles):
    code, _, err = run_cli("plan", study_file(tmp_path, CAL, change))
    one_line_error(code, err, *needles)


# -- numbers: finite, bounded, runnable ---------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("base,change,needles", [
    (CAL, lambda d: d["stages"][0]["config"].update(epochs=10**18), ["epochs"]),
    (EVAS, lambda d: d["stages"][0]["config"]["train"].update(epochs=1e15), ["train.epochs"]),
    (EVAS, lambda d: d["stages"][0]["config"]["train"].update(lr=float("inf")), ["train.lr"]),
    (EVAS, lambda d: d["stages"][0]["config"].update(generator={"channels": [-8, 0, 32]}),
     ["generator.channels"]),
    (EVAS, lambda d: d["stages"][0]["config"].update(generator={"target": 10}),
     ["generator.target 10", "classes 0..9"]),
    (VICTIM, lambda d: d["stages"][0]["config"]["model_kwargs"].update(C=-8),
     ["model_kwargs", "darts"]),
    (CAL, lambda d: d["stages"][0]["config"].update(seed=2**70), ["seed"]),
    (CAL, lambda d: d["profiles"]["smoke"].update(seed=2**70), ["profiles.smoke.seed"]),
    (CAL, lambda d: d["stages"][0]["config"].update(seconds_per_epoch=float("inf")),
     ["seconds_per_epoch"]),
    (CAL, lambda d: d["stages"][0].update(resources={"cpu": float("inf")}), ["resources.cpu"]),
], ids=["epochs-1e18", "epochs-1e15-float", "lr-inf", "generator-channels", "generator-target",
        "victim-C-negative",
        "seed-2**70", "profile-seed-2**70", "inf", "resources-inf"])
def test_numbers_are_finite_and_bounded(run_cli, tmp_path, base, change, needles):
    code, _, err = run_cli("plan", study_file(tmp_path, base, change))
    one_line_error(code, err, *needles)


@pytest.mark.timeout(30)
def test_a_huge_grid_is_refused_without_being_expanded(run_cli, tmp_path):
    f = study_file(tmp_path, CAL, lambda d: d["stages"][0].update(
        grid={"index": list(range(2000)), "size": list(range(1, 2000))}))
    t0 = time.perf_counter()
    code, _, err = run_cli("plan", f)
    one_line_error(code, err, "3,998,000 trials", "100,000")
    assert time.perf_counter() - t0 < 15


# -- command-line options -----------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,needle", [
    (["--cpus-per-trial", "nan"], "--cpus-per-trial"),
    (["--cpus-per-trial", "inf"], "--cpus-per-trial"),
    (["--gpus-per-trial", "inf"], "--gpus-per-trial"),
    (["--resource-timeout", "nan"], "--resource-timeout"),
    (["--seed", str(2**70)], "--seed"),
    (["--num-archs", str(10**9)], "--num-archs"),
    (["--profile", ""], "unknown profile ''"),
    (["--dataset", ""], "unknown dataset ''"),
])
def test_bad_numbers_on_the_command_line(run_cli, tmp_path, args, needle):
    code, _, err = run_cli("run", "calibrate", "--workdir", str(tmp_path / "wd"), *args)
    one_line_error(code, err, needle)
    assert not (tmp_path / "wd").exists()  # refused before anything was created


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,needle", [(["--gpus-per-trial", "2"], "2 GPU"),
                                         (["--cpus-per-trial", "512"], "512 CPU")])
def test_more_than_this_machine_has_is_refused_before_ray_starts(run_cli, tmp_path, args,
                                                                 needle, monkeypatch):
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the same on a GPU machine
    code, _, err = run_cli("run", "calibrate", "--workdir", str(tmp_path / "wd"), *args)
    one_line_error(code, err, "stage probe", needle, "this machine has")
    assert not (tmp_path / "wd").exists()


@pytest.mark.timeout(180)
def test_more_than_the_cluster_has_is_refused_after_ray_starts_not_a_hang(run_cli, tmp_path,
                                                                          capsys, monkeypatch):
    """The one test here that starts Ray (a 1-CPU instance standing in for a cluster that
    is smaller than this machine): Tune would wait forever for a 2-CPU bundle; the check
    right after Ray starts names what is missing."""
    import logging

    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # earlier tests may have imported MLflow at INFO; a fresh `nasrisk` process imports it
    # after main() set MLFLOW_LOGGING_LEVEL=WARNING
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    mlflow_logger.setLevel(logging.WARNING)
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level=logging.WARNING)
    capsys.readouterr()
    try:
        t0 = time.perf_counter()
        code, _, err = run_cli("run", "calibrate", "--workdir", str(tmp_path / "wd"),
                               "--cpus-per-trial", "2", "--no-report")
        one_line_error(code, err, "stage probe", "2 CPU", "largest node: 1 CPU + 0 GPU")
        assert time.perf_counter() - t0 < 60
    finally:
        ray.shutdown()
        mlflow_logger.setLevel(level)


# -- service probes -----------------------------------------------------------------------

@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never answers (a hung server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    for c in conns:
        c.close()
    srv.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,needles", [
    (["--tracking-uri", "garbage"], ["tracking URI 'garbage'", "http(s)://"]),
    (["--tracking-uri", "ftp://x"], ["tracking URI 'ftp://x'"]),
    (["--tracking-uri", "http://127.0.0.1:{closed}"], ["did not answer", "refused"]),
    (["--tracking-uri", "http://127.0.0.1:{silent}"], ["did not answer", "no answer within"]),
    (["--tracking-uri", "http://"], ["names no host"]),
    (["--tracking-uri", "postgresql://u@127.0.0.1:{closed}/db"], ["postgresql server"]),
    (["--tracking-uri", "file:///tmp/nasrisk-mlruns"], ["file store", "sqlite:///PATH"]),
    (["--address", "garbage"], ["'garbage' is not a Ray address"]),
    (["--address", "127.0.0.1:{closed}"], ["Ray head (GCS)", "did not answer"]),
    (["--address", "ray://127.0.0.1:{closed}"], ["Ray Client server"]),
    (["--address", "http://127.0.0.1:8265"], ["dashboard"]),
    (["--address", "127.0.0.1:99999"], ["not a Ray address"]),
], ids=["uri-garbage", "uri-ftp", "uri-refused", "uri-silent", "uri-no-host", "uri-postgres",
        "uri-file-store",
        "addr-garbage", "addr-refused", "addr-client", "addr-dashboard", "addr-bad-port"])
def test_services_are_probed_with_a_short_timeout(run_cli, tmp_path, silent_port, args,
                                                  needles, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    args = [a.format(closed=_closed_port(), silent=silent_port) for a in args]
    t0 = time.perf_counter()
    code, _, err = run_cli("run", "calibrate", "--workdir", str(tmp_path / "wd"), *args)
    elapsed = time.perf_counter() - t0
    one_line_error(code, err, *needles)
    assert elapsed < 15, elapsed  # the probe's 2.5 s timeout, not MLflow's 200 s of retries


# -- workdirs -----------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_bad_tracking_uri_from_the_environment_is_named(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "ftp://x")
    code, _, err = run_cli("report", "evas-kappa", "--workdir", str(tmp_path / "wd"))
    one_line_error(code, err, "$MLFLOW_TRACKING_URI", "ftp://x")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["file", "under-file"])
def test_workdir_that_cannot_be_a_folder(run_cli, tmp_path, where):
    f = tmp_path / "afile"
    f.write_text("x")
    wd = f if where == "file" else f / "sub"
    code, _, err = run_cli("run", "calibrate", "--workdir", str(wd))
    one_line_error(code, err, "workdir", str(f))


_AS_USER = """
import sys
from nasrisk.study.cli import main
for args in sys.argv[1:]:
    sys.argv = ["nasrisk", *args.split("|")]
    try:
        main()
    except SystemExit as e:
        print(f"exit {e.code}", file=sys.stderr)
    print("----", file=sys.stderr, flush=True)
"""


@pytest.mark.timeout(120)
def test_workdir_and_study_file_without_permission(tmp_path):
    """Permissions bind root only through another user: run the CLI as `nobody` then (one
    process for both commands: its imports are most of the cost)."""
    wd = tmp_path / "ro"
    wd.mkdir()
    study = Path(study_file(tmp_path, CAL))
    study.chmod(0o000)
    wd.chmod(0o555)
    cmd = [sys.executable, "-c", _AS_USER]
    env = {**os.environ, "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": ""}
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "root needs setpriv to drop privileges for this test"
        for p in [tmp_path, *tmp_path.parents]:
            p.chmod(p.stat().st_mode | 0o111)  # nobody may walk to the files
        cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    try:
        p = subprocess.run([*cmd, f"plan|{study}", f"run|calibrate|--workdir|{wd}"],
                           capture_output=True, text=True, timeout=100, env=env, cwd=tmp_path)
    finally:
        wd.chmod(0o755)
        study.chmod(0o644)
    parts = p.stderr.split("----\n")
    assert len(parts) == 3, p.stderr
    for part, needles in zip(parts[:2], [["cannot read study file", "Permission denied"],
                                          ["cannot write in workdir", str(wd)]], strict=True):
        *err, code = part.strip().splitlines()
        assert code == "exit 2", part
        one_line_error(2, "\n".join(err), *needles)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["runs?x=1", "runs%41"])
def test_sqlite_store_lands_inside_a_workdir_with_uri_characters(tmp_path, name):
    """`?` would end the SQLite path (SQLAlchemy reads it as the URI's query) and `%` would be
    unquoted: the store must still be <workdir>/mlflow.db (SQLAlchemy opens what MLflow
    opens; MLflow itself is checked once)."""
    import sqlalchemy

    from nasrisk.study.probes import sqlite_path
    from nasrisk.study.tracking import default_tracking_uri

    wd = tmp_path / name
    wd.mkdir()
    uri = default_tracking_uri(wd)
    assert sqlite_path(uri) == wd / "mlflow.db"
    engine = sqlalchemy.create_engine(uri)
    with engine.begin() as con:
        con.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))
    engine.dispose()
    assert (wd / "mlflow.db").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []
    if "?" in name:
        from nasrisk.study.tracking import ensure_experiment

        (wd / "mlflow.db").unlink()
        ensure_experiment(uri, "cal", wd / "mlartifacts")
        assert (wd / "mlflow.db").stat().st_size > 0
        assert [p.name for p in tmp_path.iterdir() if p.is_file()] == []


# -- stores and datasets ------------------------------------------------------------------

def _bad_store(kind: str, path: Path) -> None:
    if kind == "directory":
        path.mkdir()
    elif kind == "not-sqlite":
        path.write_bytes(b"this is not a database\n" * 50)
    elif kind in ("truncated", "other-app"):
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE notes (body TEXT)")
        con.executemany("INSERT INTO notes VALUES (?)", [("x" * 500,)] * 400)
        con.commit()
        con.close()
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[:100] + b"\x00" * 4096 + data[100 + 4096:len(data) // 2])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["run", "report"])
@pytest.mark.parametrize("kind,needle", [
    ("directory", "is a directory"), ("not-sqlite", "not a SQLite database"),
    ("truncated", "corrupt"), ("other-app", "not an MLflow store")])
def test_a_broken_mlflow_db(run_cli, tmp_path, command, kind, needle, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    wd = tmp_path / "wd"
    wd.mkdir()
    _bad_store(kind, wd / "mlflow.db")
    study = "calibrate" if command == "run" else "evas-kappa"
    code, out, err = run_cli(command, study, "--workdir", str(wd))
    one_line_error(code, err, needle, "mlflow.db")
    assert "mlflow" not in out.lower()  # no MLflow log line before the error


@pytest.mark.timeout(60)
def test_a_corrupt_cifar_batch_is_named(run_cli, tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for f in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
              "test_batch", "batches.meta"]:
        (folder / f).write_bytes(os.urandom(2048))
    code, _, err = run_cli("run", "evas-kappa", "--dataset", "cifar10", "--num-archs", "1",
                           "--data-root", str(tmp_path / "data"),
                           "--workdir", str(tmp_path / "wd"))
    one_line_error(code, err, str(folder / "data_batch_1"), "corrupt")


# -- run records (what `resume` reads) ----------------------------------------------------

def _record(tmp_path: Path) -> dict:
    return {"study": "cal", "spec_yaml": yaml.safe_dump(CAL), "tracking_uri":
            f"sqlite:///{tmp_path}/wd/mlflow.db", "options": {"profile": "smoke"},
            "address": None, "data_root": str(tmp_path / "wd" / "data"), "download": False,
            "tune_experiments": {}, "tune_trials": {}}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage,needles", [
    (lambda r, s: s[: len(s) // 2], ["run.json", "cannot be read"]),
    (lambda r, s: "\x00\xff garbage", ["run.json"]),
    (lambda r, s: "[1, 2]", ["run.json", "not a valid run record"]),
    (lambda r, s: json.dumps({k: v for k, v in r.items() if k != "spec_yaml"}), ["spec_yaml"]),
    (lambda r, s: json.dumps({**r, "options": {"colour": 1}}), ["options", "colour"]),
    (lambda r, s: json.dumps({**r, "options": {"seed": 2**70}}), ["options", "--seed"]),
    (lambda r, s: json.dumps({**r, "options": "smoke"}), ["options"]),
    (lambda r, s: json.dumps({**r, "spec_yaml": "name: [unclosed"}), ["spec_yaml", "YAML"]),
    (lambda r, s: json.dumps({**r, "spec_yaml": "name: cal\n"}), ["spec_yaml", "profiles"]),
    (lambda r, s: json.dumps({**r, "tune_experiments": "x"}), ["tune_experiments"]),
    (lambda r, s: json.dumps({**r, "tracking_uri": "ftp://x"}), ["tracking URI 'ftp://x'"]),
], ids=["truncated", "binary", "a-list", "no-spec", "unknown-option", "seed-option",
        "options-str", "spec-bad-yaml", "spec-invalid", "tune-experiments-str", "bad-uri"])
def test_a_damaged_run_record(run_cli, tmp_path, damage, needles):
    rec = _record(tmp_path)
    d = tmp_path / "wd" / "studies" / "cal"
    d.mkdir(parents=True)
    (d / "run.json").write_text(damage(rec, json.dumps(rec, indent=2)))
    code, _, err = run_cli("resume", "cal", "--workdir", str(tmp_path / "wd"))
    one_line_error(code, err, *needles)


def test_report_names_match_the_report_registry():
    from nasrisk.analysis.reports import REPORTS
    from nasrisk.study.spec import REPORT_NAMES

    assert sorted(REPORT_NAMES) == sorted(REPORTS)


# -- derived stages (issue 8): from / select / take ----------------------------------------

DERIVED = {
    "name": "der", "default_profile": "smoke",
    "stages": [{"name": "score", "kind": "calibrate", "config": {"epochs": 1, "size": 4},
                "grid": {"index": [0, 1]}},
               {"name": "best", "kind": "calibrate", "from": "score",
                "select": {"selector": "top_k", "k": 1, "metric": "value", "mode": "max"},
                "take": {"index": "config.index"}},
               {"name": "last", "kind": "calibrate", "grid": {"index": [5]}}],
    "profiles": {"smoke": {}},
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("change,needles", [
    (lambda d: d["stages"][1].update({"from": "nope"}), ["stage best", "from 'nope'",
                                                         "no such stage"]),
    (lambda d: d["stages"][1].update({"from": "last"}), ["stage best", "from 'last'",
                                                         "not an earlier stage"]),
    (lambda d: d["stages"][1]["select"].update(selector="worst"),
     ["unknown selector 'worst'", "top_k"]),
    (lambda d: d["stages"][1]["select"].update(k="many"), ["select (top_k): k"]),
    (lambda d: d["stages"][1]["take"].update(seed="metrics.kappa"),
     ["take seed", "no metric 'kappa'", "value"]),
    (lambda d: d["stages"][1].update(cases=[{"size": 8}]), ["stage best", "no cases"]),
], ids=["from-unknown", "from-later", "unknown-selector", "bad-selector-field",
        "undeclared-metric", "derived-with-cases"])
def test_bad_derived_stages(run_cli, tmp_path, change, needles):
    f = study_file(tmp_path, DERIVED, change)
    code, _, err = run_cli("plan", f)
    one_line_error(code, err, *needles)
    code, _, err = run_cli("run", f, "--workdir", str(tmp_path / "wd"))
    one_line_error(code, err, *needles)
    assert not (tmp_path / "wd").exists()  # refused before anything (Ray, MLflow) started


@pytest.mark.timeout(60)
def test_a_derived_stage_asking_more_than_the_machine_has_is_refused_before_ray(
        run_cli, tmp_path):
    # it has no trials until its source ran, but one trial of it will need these resources
    f = study_file(tmp_path, DERIVED,
                   lambda d: d["stages"][1].update(resources={"cpu": 1000}))
    code, _, err = run_cli("run", f, "--workdir", str(tmp_path / "wd"))
    one_line_error(code, err, "stage best", "1000 CPU")


@pytest.mark.timeout(60)
def test_a_missing_dataset_of_a_nested_victim_is_named_before_ray(run_cli, tmp_path):
    # the attack stage's dataset sits inside its victim: it is checked as the top-level one is
    study = {"name": "nested", "default_profile": "smoke", "profiles": {"smoke": {}},
             "stages": [{"name": "attacks", "kind": "attack",
                         "config": {"victim": {"model": "resnet18", "dataset": "cifar10"},
                                    "attack": "pgd_targeted", "n_inputs": 2}}]}
    f = study_file(tmp_path, study, lambda d: None)
    code, _, err = run_cli("run", f, "--workdir", str(tmp_path / "wd"),
                           "--data-root", str(tmp_path / "nodata"))
    one_line_error(code, err, "cifar-10-batches-py", "--download")
