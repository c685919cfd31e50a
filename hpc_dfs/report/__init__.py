"""The HTML report of a run (``hpc-dfs report``): one self-contained page, read from the stages' outputs.

- :mod:`hpc_dfs.report.sources`           every source, read once through the contracts (``gather``)
- :mod:`hpc_dfs.report.checks`            the warnings box's checks
- :mod:`hpc_dfs.report.stats`             AUC confidence intervals and class counts behind the checks
- :mod:`hpc_dfs.report.charts`            curves, ROC, calibration, case overlays
- :mod:`hpc_dfs.report.sections_run`      run facts, configuration, data, curves, validation
- :mod:`hpc_dfs.report.sections_results`  evaluation, overlays, prediction, clinical model
- :mod:`hpc_dfs.report.sections_cv`       a cross-validation run: per-fold figures, the pooled out-of-fold set
- :mod:`hpc_dfs.report.html`              the style sheet, cells, tables and the page around the sections
- :mod:`hpc_dfs.report.page`              :func:`~hpc_dfs.report.page.build_report`: the whole page
"""
from hpc_dfs.report.checks import clinical_warnings, detection_warnings, evaluation_warnings, training_warnings
from hpc_dfs.report.page import build_report
from hpc_dfs.report.sections_results import ranked_cases
from hpc_dfs.report.sources import ReportError, load_checkpoint_meta
from hpc_dfs.report.stats import auc_ci_hanley, clinical_stats

__all__ = ["build_report", "ReportError", "load_checkpoint_meta", "auc_ci_hanley", "clinical_stats",
           "clinical_warnings", "detection_warnings", "evaluation_warnings", "training_warnings", "ranked_cases"]
