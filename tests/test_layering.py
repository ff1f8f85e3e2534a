"""trials/ is plain PyTorch: it never imports ray or mlflow (study/ wraps trials)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_trials_never_import_ray_or_mlflow():
    pat = re.compile(r"^\s*(import|from)\s+(ray|mlflow)\b", re.M)
    offenders = [str(p) for p in (ROOT / "trials").rglob("*.py") if pat.search(p.read_text())]
    assert offenders == []


def test_no_unsafe_loading_in_the_product():
    offenders = [f"{p}:{i}" for d in ("trials", "study", "analysis")
                 for p in (ROOT / d).rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "torch.load(" in line and "weights_only=True" not in line]
    assert offenders == []


def test_trials_never_imports_study_or_analysis():
    # the layering of STYLE.md: study/ wraps trials/, analysis/ reads MLflow; trials/ knows
    # neither (nor ray, nor mlflow: the test above)
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "trials"
    bad = [f"{p.relative_to(root.parent)}:{i}" for p in root.rglob("*.py")
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.match(r"\s*(from|import)\s+(nasrisk\.(study|analysis)|\.\.+(study|analysis))\b",
                       line)]
    assert not bad, bad


def test_every_package_is_listed_for_installation():
    # pyproject.toml lists the packages explicitly (package-dir maps the folders); a package
    # missing there works in an editable install and is absent from a wheel
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {"nasrisk." + ".".join(p.parent.relative_to(root).parts)
             for top in ("study", "trials", "analysis") for p in (root / top).rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
