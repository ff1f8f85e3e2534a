"""The CLI: --help everywhere; every user mistake is one line on stderr, exit 2, no traceback."""

import subprocess
import sys

import pytest
import yaml
from checks import one_line_error

EVAS_BAD = {
    "name": "bad-evas", "default_profile": "smoke",
    "stages": [{"name": "evas", "kind": "evas", "config": {"C": 4, "N": 1, "train": {"epochs": 1}},
                "grid": {"arch": ["|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"]}}],
    "profiles": {"smoke": {"dataset": "embedded"}},
}


def _bad_file(tmp_path, change):
    import copy

    d = copy.deepcopy(EVAS_BAD)
    change(d)
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


@pytest.mark.parametrize("cmd", [[], ["studies"], ["plan"], ["run"], ["resume"], ["report"],
                                 ["models"]])
def test_help(run_cli, cmd):
    code, out, err = run_cli(*cmd, "--help")
    assert code == 0 and "Usage" in out and len(out.splitlines()) > 5


@pytest.mark.parametrize("cmd", [[], ["studies"], ["plan"], ["run"], ["resume"], ["report"],
                                 ["models"]])
def test_help_text_reads_as_written(run_cli, cmd, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(*cmd, "--help")
    assert code == 0
    assert "<bool>" not in out and "[default: report]" not in out
    assert not any(ln.rstrip().endswith("--no-") for ln in out.splitlines())  # an option cut
    if "--workdir" in out:  # the "[default: ...]" notes are printed, not eaten as markup
        assert "./nasrisk-runs" in out
    if not cmd:  # each command's one-line summary is whole: no "...", ends a sentence
        section = out.split("Commands:", 1)[1]
        entries, cur = [], ""
        for ln in section.splitlines():
            if ln.startswith("  ") and not ln.startswith("   "):
                entries.append(cur)
                cur = ln
            else:
                cur += " " + ln.strip()
        entries = [e.strip() for e in [*entries, cur] if e.strip()]
        assert len(entries) == 7, section
        for e in entries:
            assert e.endswith(".") and "..." not in e, e


def test_studies_output_reads_as_written(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = run_cli("studies")
    assert code == 0
    # each study's summary is its first sentence, whole (lines until the first --profile)
    text = " ".join(ln.strip() for ln in out.split("evas-kappa:", 1)[1].split("--profile")[0]
                    .splitlines())
    assert text.strip().endswith("on the trained arch."), text
    assert all(len(ln) <= 100 for ln in out.splitlines())
    code, out, _ = run_cli("studies", "--show", "evas-kappa")
    assert code == 0 and "" not in out.splitlines(), out  # no stray blank lines
    assert "description: |" in out
    assert yaml.safe_load(out)["description"].startswith("EVAS (Pang et al., ICLR 2023)")


def test_unknown_study(run_cli):
    code, _, err = run_cli("run", "no-such-study")
    one_line_error(code, err, "unknown study 'no-such-study'")


def test_unknown_profile(run_cli):
    code, _, err = run_cli("plan", "evas-kappa", "--profile", "giant")
    one_line_error(code, err, "unknown profile 'giant'")


def test_unknown_dataset(run_cli):
    code, _, err = run_cli("run", "evas-kappa", "--dataset", "mnist3d")
    one_line_error(code, err, "unknown dataset 'mnist3d'")


def test_missing_dataset_file_says_where(run_cli, tmp_path):
    code, _, err = run_cli("run", "evas-kappa", "--dataset", "cifar10", "--num-archs", "2",
                           "--workdir", str(tmp_path / "wd"), "--data-root", str(tmp_path / "d"))
    one_line_error(code, err, "cifar-10-batches-py")
    assert "--download" in err
    code, _, err = run_cli("run", "evas-kappa", "--dataset", "imagenet16-120",
                           "--data-root", str(tmp_path / "d"), "--workdir", str(tmp_path / "wd"))
    one_line_error(code, err, "ImageNet16")


def test_unknown_field(run_cli, tmp_path):
    f = _bad_file(tmp_path, lambda d: d["stages"][0]["config"].update(colour=1))
    code, _, err = run_cli("plan", f)
    one_line_error(code, err, "colour: unknown field")


def test_malformed_arch_string(run_cli, tmp_path):
    f = _bad_file(tmp_path, lambda d: d["stages"][0]["grid"].update(arch=["|nor_conv_3x3~0|+|"]))
    code, _, err = run_cli("run", f)
    one_line_error(code, err, "arch")


def test_negative_epochs(run_cli, tmp_path):
    f = _bad_file(tmp_path, lambda d: d["stages"][0]["config"]["train"].update(epochs=-3))
    code, _, err = run_cli("run", f)
    one_line_error(code, err, "train.epochs")


def test_bad_numbers_on_the_command_line(run_cli):
    code, _, err = run_cli("run", "evas-kappa", "--num-archs", "0")
    one_line_error(code, err, "--num-archs")
    code, _, err = run_cli("run", "evas-kappa", "--max-failures", "-1")
    one_line_error(code, err, "--max-failures")


def test_resume_without_a_run(run_cli, tmp_path):
    code, _, err = run_cli("resume", "evas-kappa", "--workdir", str(tmp_path))
    one_line_error(code, err, "no run of study 'evas-kappa'")


def test_report_without_a_store(run_cli, tmp_path):
    code, _, err = run_cli("report", "evas-kappa", "--workdir", str(tmp_path))
    one_line_error(code, err, "no MLflow store")


def test_studies_lists_profiles_and_counts(run_cli):
    code, out, _ = run_cli("studies")
    assert code == 0 and "evas-kappa" in out and "--profile paper" in out and "900 trials" in out
    code, out, _ = run_cli("studies", "--show", "evas-kappa")
    assert code == 0 and yaml.safe_load(out)["name"] == "evas-kappa"


def test_plan_prints_trials_and_resources(run_cli, tmp_path):
    code, out, _ = run_cli("plan", "evas-kappa", "--workdir", str(tmp_path))
    assert code == 0 and "24 trials" in out and "1 CPU + 0 GPU" in out
    assert "no measured cost" in out


def test_console_script_exits_2_without_traceback():
    exe = [sys.executable, "-m", "nasrisk.study.cli", "run", "definitely-not-a-study"]
    p = subprocess.run(exe, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("nasrisk: error: unknown study")


def test_models_lists_the_zoo_with_parameter_counts(run_cli):
    code, out, _ = run_cli("models")
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[1:]}
    assert code == 0 and rows["darts"][2] == "3,349,342" and rows["resnet18"][1] == "manual"
    assert sum(r[1] == "nas" for r in rows.values()) == 10
    assert sum(r[1] == "manual" for r in rows.values()) == 7
    code, out, _ = run_cli("models", "--stats")
    darts = next(ln.split() for ln in out.splitlines() if ln.startswith("darts "))
    # depth, Table 3 width (nodes fed only by inputs), normal-cell skips, Shu et al.'s width
    assert code == 0 and darts[1:5] == ["3", "3", "2", "3.5"]
    code, _, err = run_cli("models", "--dataset", "svhn")
    one_line_error(code, err, "unknown dataset 'svhn'")
