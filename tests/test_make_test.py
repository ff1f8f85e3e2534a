"""`make test` (what CI runs) reruns the outcome-marked tests on PyTorch's portable CPU kernels
(issue 13): the rerun really gets the default kernels, runs only outcome tests, tolerates an
empty selection (pytest exit 5) and fails when an outcome test fails."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _recipe() -> list[str]:
    """The shell lines `make test` would run (dry run: nothing is executed)."""
    out = subprocess.run(["make", "-n", "-s", "test"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [ln for ln in out.replace("\\\n", " ").splitlines() if "pytest" in ln]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_reruns_outcome_tests_under_default_kernels(tmp_path):
    lines = _recipe()
    assert len(lines) == 2, lines
    assert '-m "not slow and not gpu"' in lines[0] and "ATEN_CPU_CAPABILITY" not in lines[0]
    rerun = lines[1]
    assert rerun.startswith("ATEN_CPU_CAPABILITY=default ")
    assert '-m "outcome and not slow and not gpu"' in rerun

    # run the rerun line itself on small test files instead of the suite
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    outcome: o\n    slow: s\n"
                                         "    gpu: g\n")
    cmd = rerun.replace(".venv/bin/python", shlex.quote(sys.executable))

    def run(body: str) -> int:
        (tmp_path / "test_it.py").write_text(body)
        return subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True,
                              timeout=300).returncode

    kernels = ("import pytest, torch\n\n@pytest.mark.outcome\ndef test_kernels():\n"
               "    assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n\n"
               "def test_unmarked_is_not_rerun():\n    assert False\n")
    assert run(kernels) == 0
    assert run("def test_nothing_marked():\n    assert False\n") == 0   # exit 5: none collected
    assert run("import pytest\n\n@pytest.mark.outcome\ndef test_f():\n    assert False\n") != 0
