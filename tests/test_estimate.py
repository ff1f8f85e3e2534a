"""`nasrisk plan`'s resources and estimate (study/estimate.py)."""

from __future__ import annotations

import pytest

from nasrisk.study.plan import RunOptions, build_plan
from nasrisk.study.spec import load_spec


@pytest.mark.parametrize("study", ["evas-kappa", "automl-risks", "evas-atlas", "evas-search"])
def test_paper_profiles_ask_for_gpus(study):
    spec = load_spec(study)
    plan = build_plan(spec, RunOptions(profile="paper"))
    for st in plan.stages:
        assert 0 < st.resources.gpu <= 1, (study, st.spec.name, st.resources)
    smoke = build_plan(spec, RunOptions(profile="smoke"))
    assert all(st.resources.gpu == 0 for st in smoke.stages)  # smoke stays on CPUs
