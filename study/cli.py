"""The ``nasrisk`` command. Thin: parse, validate, call. A user's mistake (unknown study,
field, dataset, profile; malformed arch string; missing data file) prints one line and exits 2.

The error boundary covers more than config validation: every profile of the study file is
planned, the workdir is created and written to, the tracking store and the Ray address are
probed (study/probes.py) and the datasets are read, all before MLflow or Ray start; Ray's
resources are checked against each stage right after Ray starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from nasrisk.trials.errors import UserError

from .commands import shell_command
from .guard import StudyInterrupted
from .store_cmd import app as store_app

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    # plain help: rich markup would eat every "[default: ...]" and label flags `<bool>`
    rich_markup_mode=None,
    help="Run security studies of neural architecture search on Ray Tune, tracked in MLflow.\n\n"
         "Typical use: `nasrisk studies`, `nasrisk plan evas-kappa`, `nasrisk run evas-kappa`, "
         "`nasrisk report evas-kappa`, `mlflow ui ...` (printed at the end of a run).",
)

app.add_typer(store_app, name="store")  # `nasrisk store ls|verify` (study/store_cmd.py)

Study = Annotated[str, typer.Argument(help="A built-in study name (see `nasrisk studies`) or "
                                           "a path to a YAML study file.")]
Workdir = Annotated[Path | None, typer.Option(
    "--workdir", help="Where everything the study produces lives (MLflow store, Tune state, "
                      "checkpoints, reports). [default: ./nasrisk-runs or $NASRISK_WORKDIR]")]
Tracking = Annotated[str | None, typer.Option(
    "--tracking-uri", help="MLflow tracking URI, e.g. http://MLFLOW:5000. [default: "
                           "$MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db]")]
UNIQUE_HELP = ("One arch per isomorphism class (6,466 of 15,625): with --all the arch list; "
               "the kappa atlas scores those classes.")
Profile = Annotated[str | None, typer.Option(
    "--profile", help="Study profile: `smoke` (embedded data, tiny, minutes on a laptop) or "
                      "`paper` (the published protocol). [default: the study's default]")]


def _mlflow_ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:"):
        import shlex  # a workdir may hold spaces, `?`, `#` ...

        return (f"{shell_command('mlflow')} ui --backend-store-uri {shlex.quote(uri)} "
                "--host 127.0.0.1 --port 5000")
    return f"open {uri} in a browser"


@app.command()
def studies(show: Annotated[str | None, typer.Option(
        "--show", help="Print this built-in study as YAML: a valid study file to copy and "
                       "edit, then run with `nasrisk run my-study.yaml`.")] = None) -> None:
    """List the built-in studies with their profiles and trial counts."""
    import shutil
    import textwrap

    from .plan import count_trials
    from .spec import builtin_names, load_spec, spec_to_yaml, summary_line

    if show:
        if show not in builtin_names():
            raise UserError(f"unknown study {show!r}; built-in: {', '.join(builtin_names())}")
        typer.echo(spec_to_yaml(load_spec(show)), nl=False)
        return
    width = min(shutil.get_terminal_size().columns, 100)
    for name in builtin_names():
        spec = load_spec(name)
        typer.echo(textwrap.fill(f"{name}: {summary_line(spec.description)}", width,
                                 subsequent_indent="    "))
        derived = {st.name for st in spec.stages if st.from_ is not None}
        for pname, prof in spec.profiles.items():
            counts = count_trials(spec, pname)  # no trial kind imported: no torch
            per = ", ".join(f"{stage} {'up to ' if stage in derived else ''}"
                            f"{'?' if n is None else n}" for stage, n in counts)
            fixed = sum(n or 0 for stage, n in counts if stage not in derived)
            bounds = [n for stage, n in counts if stage in derived]
            more = ("" if not bounds else " + up to ?" if None in bounds
                    else f" + up to {sum(bounds)}")
            default = " (default)" if pname == spec.default_profile else ""
            typer.echo(textwrap.fill(
                f"--profile {pname}{default}: {fixed}{more} trials ({per}); "
                f"{prof.description}", width, initial_indent="  ", subsequent_indent="      "))


@app.command(short_help="Show the trials, resources and estimated compute of a study, "
                        "without running anything.")
def plan(study: Study, profile: Profile = None,
         dataset: Annotated[str | None, typer.Option(help="Dataset override.")] = None,
         num_archs: Annotated[int | None, typer.Option(help="Number of archs to sample.")] = None,
         all_archs: Annotated[bool, typer.Option("--all", help="All 15,625 NATS archs.")] = False,
         unique: Annotated[bool, typer.Option("--unique", help=UNIQUE_HELP)] = False,
         workdir: Workdir = None, tracking_uri: Tracking = None) -> None:
    """Show the trials, resources per trial and estimated compute, without running anything.

    The estimate uses the measured per-trial time of finished trials of the same study and
    stage in the tracking store (run the smoke profile once to get one)."""
    from .estimate import describe_plan
    from .plan import RunOptions, build_plan

    opts = RunOptions(profile=profile, dataset=dataset, num_archs=num_archs, all_archs=all_archs,
                      unique=unique)
    p = build_plan(_load(study), opts)
    uri = _tracking_uri(tracking_uri, workdir)
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _store_exists(uri):
        _check_uri(uri, tracking_uri, writable=False)
    typer.echo(describe_plan(p, workdir=workdir, tracking_uri=uri))


@app.command(short_help="Run a study on Ray Tune (local or cluster), tracked in MLflow, then "
                        "report on it.")
def run(
    study: Study,
    profile: Profile = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset override (e.g. embedded, "
                                                        "cifar10, cifar100, imagenet16-120).")] = None,
    num_archs: Annotated[int | None, typer.Option(help="Number of NATS archs to sample.")] = None,
    all_archs: Annotated[bool, typer.Option("--all", help="Use all 15,625 NATS archs.")] = False,
    unique: Annotated[bool, typer.Option("--unique", help=UNIQUE_HELP)] = False,
    workdir: Workdir = None,
    tracking_uri: Tracking = None,
    address: Annotated[str | None, typer.Option(help="Ray address of a running cluster "
                                                        "[default: $RAY_ADDRESS, else a local "
                                                        "instance on 127.0.0.1]")] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="CPUs one trial reserves.")] = None,
    gpus_per_trial: Annotated[float | None, typer.Option(help="GPUs one trial reserves "
                                                                 "(fractions share a GPU).")] = None,
    max_failures: Annotated[int, typer.Option(help="Retries of a failed trial (each resumes "
                                                   "from its last checkpoint).")] = 2,
    seed: Annotated[int | None, typer.Option(help="Seed of every trial.")] = None,
    params: Annotated[str | None, typer.Option(help="Parameter set: paper or artifact.")] = None,
    amp: Annotated[str | None, typer.Option(help="Mixed-precision training: off (float32, "
                                                 "the default) or bf16 (autocast on CUDA).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder [default: "
                                                           "<workdir>/data]")] = None,
    download: Annotated[bool, typer.Option("--download", help="Download missing datasets "
                                                             "(CIFAR) instead of failing.")] = False,
    report: Annotated[bool, typer.Option(
        show_default=False, help="Build the study's report at the end (on by default).")] = True,
    resource_timeout: Annotated[float | None, typer.Option(
        help="Seconds to wait for the Ray cluster to offer one trial's CPUs/GPUs (an "
             "autoscaling cluster adds nodes) before refusing [default: 0 for a local "
             "instance, 600 for a cluster]")] = None,
) -> None:
    """Run a study on Ray Tune (local or cluster), tracked in MLflow, then report on it.

    Finished trials (in MLflow) are never rerun; an interrupted run continues with
    `nasrisk resume STUDY`."""
    from .plan import RunOptions, build_plan

    opts = RunOptions(profile=profile, dataset=dataset, num_archs=num_archs, all_archs=all_archs,
                      unique=unique, seed=seed, params=params, amp=amp,
                      cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                      max_failures=max_failures,
                      resource_timeout=resource_timeout)
    p = build_plan(_load(study), opts)
    with _preflight(p, workdir, tracking_uri, address, data_root, download) as uri:
        _execute(p, workdir=workdir, tracking_uri=uri, address=address,
                 data_root=data_root, download=download, restore=False, report=report)


@app.command(short_help="Continue an interrupted or partly failed study.")
def resume(study: Annotated[str, typer.Argument(help="The study name that was run.")],
           workdir: Workdir = None,
           address: Annotated[str | None, typer.Option(help="Ray address.")] = None,
           report: Annotated[bool, typer.Option(
               show_default=False, help="Build the report at the end (on by default).")
           ] = True) -> None:
    """Continue an interrupted or partly failed study: runs every trial MLflow does not hold as
    done (errored and stopped ones included), each from its newest good checkpoint."""
    from .plan import RunOptions, build_plan
    from .spec import spec_from_yaml
    from .workdir import Workdir as WD

    name = Path(study).stem if study.endswith((".yaml", ".yml")) else study
    wd = WD.at(workdir)
    rec = wd.run_record(name)
    where = str(wd.study_dir(name) / "run.json")
    try:
        opts = RunOptions(**rec["options"])
    except TypeError as e:
        raise UserError(f"{where}: options: {e}; move it away and start again with "
                        f"`nasrisk run {name}`") from None
    except UserError as e:
        raise UserError(f"{where}: options: {e}") from None
    p = build_plan(spec_from_yaml(rec["spec_yaml"], f"{where}: spec_yaml"), opts)
    address = address or rec.get("address")
    with _preflight(p, workdir, rec["tracking_uri"], address, rec["data_root"],
                    rec["download"]) as uri:
        _execute(p, workdir=workdir, tracking_uri=uri, address=address,
                 data_root=rec["data_root"], download=rec["download"], restore=True,
                 report=report)


@app.command("report", short_help="Build the study's analysis (tables, CSV, figures) from "
                                  "MLflow alone.")
def report_cmd(study: Study, workdir: Workdir = None, tracking_uri: Tracking = None) -> None:
    """Build the study's analysis from MLflow alone: tables, CSV, figures (also logged to the
    study's summary run)."""
    _report(_load(study), workdir, tracking_uri)


@app.command()
def models(dataset: Annotated[str, typer.Option(help="Dataset that sets classes/input size.")] = "cifar10",
           stats: Annotated[bool, typer.Option("--stats", help="Architecture statistics of the "
                                                               "NAS genotypes instead.")] = False) -> None:
    """List every registered model with its family and parameter count."""
    from .models_cmd import print_models

    print_models(dataset, stats)


def _load(study: str):
    """The study's spec, with every one of its profiles planned (a broken field in a profile
    not being run fails now, not the day someone runs it)."""
    from .plan import check_profiles
    from .spec import load_spec

    spec = load_spec(study)
    check_profiles(spec)
    return spec


def _tracking_uri(tracking_uri: str | None, workdir) -> str:
    from .probes import sqlite_uri
    from .workdir import Workdir as WD

    return (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or sqlite_uri(WD.at(workdir).root / "mlflow.db"))


def _check_uri(uri: str, given: str | None, **kw) -> None:
    """probes.check_tracking_uri, naming $MLFLOW_TRACKING_URI when the URI came from it."""
    from .probes import check_tracking_uri

    try:
        check_tracking_uri(uri, **kw)
    except UserError as e:
        if given is None and os.environ.get("MLFLOW_TRACKING_URI") == uri:
            raise UserError(f"$MLFLOW_TRACKING_URI: {e}") from None
        raise


def _store_exists(uri: str) -> bool:
    from .probes import sqlite_path

    path = sqlite_path(uri)
    return path is None or path.exists()


@contextmanager
def _preflight(p, workdir, tracking_uri, address, data_root, download) -> Iterator[str]:
    """Everything `run` and `resume` need from outside, checked before MLflow or Ray start;
    yields the tracking URI with the workdir locked for this driver (one driver per workdir,
    :mod:`nasrisk.study.lock`). The lock is taken before the store is probed, so a second driver
    started while the first creates its MLflow schema is told who holds the workdir rather than
    that the store looks broken."""
    from .lock import WorkdirLock
    from .probes import check_local_resources, check_ray_address
    from .workdir import Workdir as WD

    check_ray_address(address)
    check_local_resources(p.stages, address)
    wd = WD.at(workdir).prepare()
    with WorkdirLock(wd.root):
        uri = _tracking_uri(tracking_uri, workdir)
        _check_uri(uri, tracking_uri)
        _check_data(p, data_root, workdir, download)
        yield uri


def _check_data(p, data_root, workdir, download) -> None:
    """Fail before Ray starts when a dataset the plan needs is missing."""
    from nasrisk.trials.data import load_dataset

    from .workdir import Workdir as WD

    root = Path(data_root) if data_root else WD.at(workdir).data
    names: set[str] = set()
    for s in p.stages:
        for t in s.trials:
            _datasets(t.config, names)
    for n in sorted(names):
        if n != "embedded":
            load_dataset(n, root=root, download=download)


def _datasets(config, out: set[str]) -> None:
    """Every ``dataset`` field of a config, nested ones included (an attack's victim, a
    defense's model)."""
    if isinstance(config, dict):
        for k, v in config.items():
            if k == "dataset" and isinstance(v, str):
                out.add(v)
            else:
                _datasets(v, out)
    elif isinstance(config, list):
        for v in config:
            _datasets(v, out)


def _execute(p, *, workdir, tracking_uri, address, data_root, download, restore, report) -> None:
    from .runner import run_study

    def count(s) -> str:
        if s.derived is None:
            return str(len(s.trials))
        return f"derived from {s.derived.source}, up to {'?' if s.derived.upper is None else s.derived.upper}"

    more = "" if p.n_derived == 0 else f" + up to {'?' if p.n_derived is None else p.n_derived} derived"
    typer.echo(f"nasrisk: study {p.spec.name}, profile {p.profile}, {p.n_trials} trials{more} "
               f"({', '.join(f'{s.spec.name}: {count(s)}' for s in p.stages)})")
    out = run_study(p, workdir=workdir, tracking_uri=tracking_uri, address=address,
                    data_root=data_root, download=download, restore=restore)
    for s in out.stages:
        if s.blocked is not None:
            typer.echo(f"stage {s.stage}: skipped ({s.blocked})")
            continue
        typer.echo(f"stage {s.stage}: {s.finished + s.skipped}/{s.total} done "
                   f"({s.skipped} from earlier runs), {len(s.failed)} failed, "
                   f"{s.seconds:.0f} s")
    if report and p.spec.report:
        _report(p.spec, workdir, out.tracking_uri)
    typer.echo(f"MLflow store: {out.tracking_uri}")
    typer.echo(f"inspect it:   {_mlflow_ui_hint(out.tracking_uri)}")
    if out.failed:
        typer.echo(f"{out.failed} trials failed; `{shell_command('nasrisk')} resume "
                   f"{p.spec.name}` retries them",
                   err=True)
        raise typer.Exit(1)


def _report(spec, workdir, tracking_uri) -> None:
    from .workdir import Workdir as WD

    if not spec.report:
        raise UserError(f"study {spec.name} has no report")
    wd = WD.at(workdir)
    uri = _tracking_uri(tracking_uri, workdir)
    _check_uri(uri, tracking_uri, must_exist=True)
    wd.prepare()

    from nasrisk.analysis.reports import REPORTS

    rep = REPORTS[spec.report](uri, spec.name, wd.report_dir(spec.name))
    typer.echo(rep.summary())


def main() -> None:
    # MLflow's INFO lines ("Creating initial MLflow database tables...") are noise on a
    # console, and would come before a one-line error; MLFLOW_LOGGING_LEVEL=INFO shows them
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        app()
    except StudyInterrupted as e:  # SIGINT / SIGTERM: the trials were stopped cleanly
        typer.echo(f"nasrisk: {e}", err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        # one line, whatever the message quotes (a key with a newline, a multi-line reason)
        typer.echo(f"nasrisk: error: {' '.join(str(e).split())}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo(f"nasrisk: interrupted; `{shell_command('nasrisk')} resume STUDY` continues "
                   "where it stopped", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
