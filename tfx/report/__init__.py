"""Compare the runs of a sweep: table (Markdown + CSV) and Pareto plots.

    from tfx.report import load_sweep, build_report, to_markdown
    report = build_report(load_sweep("multirun/2026-01-01/12-00-00"))

Plots live in :mod:`tfx.report.plots` (imported on demand: matplotlib is slow to load
and the W&B logger imports :mod:`tfx.report.table` in every training run).
"""
from tfx.report.runs import JobRecord, ReportError, load_sweep
from tfx.report.table import METRICS, Report, Variant, build_report
from tfx.report.render import to_markdown, write_csv

__all__ = ["JobRecord", "METRICS", "Report", "ReportError", "Variant", "build_report", "load_sweep",
           "to_markdown", "write_csv"]
