"""One report module per study; a study file names its report (``report: evas``)."""

from nasrisk.analysis.reports.evas import EvasReport, build_evas_report

#: report name -> builder(tracking_uri, experiment, out_dir) -> object with ``summary()``
REPORTS = {"evas": build_evas_report}

__all__ = ["REPORTS", "EvasReport", "build_evas_report"]
