"""Compare the runs of a sweep: table (Markdown + CSV) and Pareto plots.

Per variant: mean over seeds, 95% confidence interval (Student t), ratio to the baseline
and Welch's t-test against it (:mod:`tfx.report.stats`); a warning when the jobs' data,
steps or model differ (:mod:`tfx.report.settings`).

    from tfx.report import load_sweep, build_report, to_markdown
    report = build_report(load_sweep("multirun/2026-01-01/12-00-00"))

Plots live in :mod:`tfx.report.plots` (imported on demand: matplotlib is slow to load
and the W&B logger imports :mod:`tfx.report.table` in every training run).
"""
from tfx.report.runs import JobRecord, ReportError, load_sweep
from tfx.report.table import METRICS, Comparison, Metric, Report, Stat, Variant, build_report
from tfx.report.render import to_markdown, write_csv

__all__ = ["Comparison", "JobRecord", "METRICS", "Metric", "Report", "ReportError", "Stat", "Variant",
           "build_report", "load_sweep", "to_markdown", "write_csv"]
