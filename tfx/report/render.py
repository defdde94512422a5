"""The report as Markdown (pasteable into the README) and CSV (for pandas)."""
from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import socket
from pathlib import Path
from typing import List, Optional, Sequence

from tfx.report.table import METRICS, Report, Variant


def machine_line(report: Report) -> str:
    """Where the runs ran (from their summaries) and on which host the report was made."""
    devices = sorted({f"{j.summary['device']} x{j.summary.get('world_size', 1)}"
                      for v in report.variants for j in v.ok_jobs if j.summary.get("device")})
    host = f"{socket.gethostname()} ({platform.system()} {platform.machine()}, {os.cpu_count()} CPUs)"
    return f"runs on {', '.join(devices) or 'unknown device'}; host {host}"


def header(command: str, report: Report, now: Optional[dt.datetime] = None) -> str:
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"_`{command}` · {machine_line(report)} · {now:%Y-%m-%d %H:%M} UTC_"


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "nan"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 0.01 else f"{value:.3g}"


def cell(variant: Variant, key: str) -> str:
    stat = variant.stats.get(key)
    if stat is None:
        return "–"
    return f"{fmt(stat.mean)} ± {fmt(stat.std)}" if stat.n > 1 else fmt(stat.mean)


def ratio_cell(variant: Variant, key: str) -> str:
    ratio = variant.ratios.get(key)
    return "–" if ratio is None else f"{ratio:.2f}×"


def shown_metrics(report: Report) -> List[tuple]:
    """Every metric some variant has (size only appears once evaluate.py ran)."""
    return [m for m in METRICS if any(m[0] in v.stats for v in report.variants)]


def variant_rows(report: Report) -> List[str]:
    metrics = shown_metrics(report)
    titles = ["variant", "n"] + [t for _, title, _, _ in metrics for t in (title, "vs base")]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for v in report.variants:
        name = f"`{v.label}`" + (" (baseline)" if v is report.baseline else "")
        cells = [name, str(len(v.ok_jobs))] + [c for k, *_ in metrics for c in (cell(v, k), ratio_cell(v, k))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def failed_rows(report: Report) -> List[str]:
    if not report.failed:
        return []
    lines = ["", "**Failed / incomplete**", "", "| job | variant | reason |", "|---|---|---|"]
    lines += [f"| {name} | `{label}` | {reason} |" for name, label, reason in report.failed]
    return lines


def to_markdown(report: Report, command: str, now: Optional[dt.datetime] = None,
                notes: Sequence[str] = ()) -> str:
    lines = [header(command, report, now), ""]
    lines += [line for note in notes for line in (note, "")]
    if report.common:
        lines += [f"Shared overrides: `{' '.join(report.common)}`. "
                  f"Mean ± std over seeds where n > 1; \"vs base\" = variant / baseline.", ""]
    if report.variants:
        lines += variant_rows(report)
    else:
        lines.append("No job finished.")
    return "\n".join(lines + failed_rows(report)) + "\n"


def csv_fields() -> List[str]:
    cols = ["variant", "n", "status", "baseline", "overrides"]
    for key, *_ in METRICS:
        cols += [key, f"{key}_std", f"{key}_ratio"]
    return cols


def _variant_record(report: Report, v: Variant) -> dict:
    rec = {"variant": v.label, "n": len(v.ok_jobs), "status": "ok",
           "baseline": v is report.baseline, "overrides": " ".join(v.overrides)}
    for key, *_ in METRICS:
        stat = v.stats.get(key)
        rec[key] = stat.mean if stat else ""
        rec[f"{key}_std"] = stat.std if stat else ""
        rec[f"{key}_ratio"] = v.ratios.get(key, "")
    return rec


def write_csv(report: Report, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=csv_fields(), restval="")
        writer.writeheader()
        for v in report.variants:
            writer.writerow(_variant_record(report, v))
        for name, label, reason in report.failed:
            writer.writerow({"variant": label, "n": 0, "status": f"job {name}: {reason}", "baseline": False})
