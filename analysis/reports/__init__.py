"""One report module per study; a study file names its report (``report: evas``)."""

from nasrisk.analysis.reports.automl import AutomlReport, build_automl_report
from nasrisk.analysis.reports.evas import EvasReport, build_evas_report
from nasrisk.analysis.reports.evas_atlas import build_evas_atlas_report
from nasrisk.analysis.reports.evas_eval import build_evas_eval_report
from nasrisk.analysis.reports.evas_search import build_evas_search_report

#: report name -> builder(tracking_uri, experiment, out_dir) -> object with ``summary()``
REPORTS = {"evas": build_evas_report, "automl": build_automl_report, "evas-search": build_evas_search_report, "evas-atlas": build_evas_atlas_report, "evas-eval": build_evas_eval_report}

__all__ = ["REPORTS", "AutomlReport", "EvasReport", "build_automl_report", "build_evas_report"]
