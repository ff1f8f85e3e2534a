"""`nasrisk --help`, `studies`, `studies --show` and `plan` answer at once: the commands that
only read study files import neither torch nor Ray nor MLflow, and `plan` (which validates
trial configs, whose models live beside torch code) imports neither Ray nor MLflow."""

import subprocess
import sys

import pytest

# runs the real entry point, then prints which heavy packages ended up imported
WRAPPER = """
import sys
sys.argv = ["nasrisk", *sys.argv[1:]]
from nasrisk.study.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
print("IMPORTED", sorted(m for m in ("torch", "ray", "mlflow") if m in sys.modules), "CODE", code, file=sys.stderr)
"""


def _imported(*args: str, cwd) -> list[str]:
    p = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True,
                       timeout=120, cwd=cwd)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("IMPORTED")][-1]
    assert line.endswith("CODE 0"), p.stderr
    return eval(line.split("IMPORTED", 1)[1].rsplit("CODE", 1)[0])  # a printed list of str


@pytest.mark.parametrize("args", [["--help"], ["studies"], ["studies", "--show", "evas-kappa"]])
def test_reading_commands_import_no_torch_ray_or_mlflow(args, tmp_path):
    assert _imported(*args, cwd=tmp_path) == []


def test_plan_imports_no_ray_or_mlflow(tmp_path):
    got = _imported("plan", "evas-kappa", "--workdir", str(tmp_path / "wd"), cwd=tmp_path)
    assert "ray" not in got and "mlflow" not in got, got


def test_registry_loads_its_modules_on_first_lookup():
    code = """
import sys
import nasrisk.trials
from nasrisk.trials import TRIAL_KINDS
from nasrisk.trials.errors import UserError
assert "torch" not in sys.modules, "import nasrisk.trials imported torch"
try:
    TRIAL_KINDS.get("no-such-kind")
except UserError as e:
    print(e)
assert "torch" in sys.modules and "nasrisk.trials.kinds.evas" in sys.modules
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    # the error lists the valid names, all registered by the lookup itself: one per module of
    # trials/kinds/ (but base.py and options.py, which define TrialKind and the options helper)
    from pathlib import Path

    kinds = Path(__file__).resolve().parent.parent / "trials" / "kinds"
    modules = sorted(m.stem for m in kinds.glob("*.py") if m.stem not in ("__init__", "base", "options"))
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("unknown trial kind"))
    assert line.startswith("unknown trial kind 'no-such-kind'; valid: attack, calibrate")
    assert sorted(line.split("valid: ")[1].split(", ")) == modules


def test_studies_counts_equal_the_plans_counts():
    """`nasrisk studies` counts trials without validating them (no trial kind imported): the
    counts must be the plan's, stage by stage, for every built-in study and profile."""
    from nasrisk.study.plan import RunOptions, build_plan, count_trials
    from nasrisk.study.spec import builtin_names, load_spec

    for name in builtin_names():
        spec = load_spec(name)
        for pname in spec.profiles:
            plan = build_plan(spec, RunOptions(profile=pname))
            assert count_trials(spec, pname) == [
                (s.spec.name, len(s.trials) if s.derived is None else s.derived.upper)
                for s in plan.stages], (name, pname)
