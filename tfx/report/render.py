"""The report as Markdown (pasteable into the README) and CSV (for pandas)."""
from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import socket
from pathlib import Path
from typing import List, Optional, Sequence

from tfx.report.settings import warning_lines
from tfx.report.table import ALPHA, METRIC_BY_KEY, METRICS, Metric, Report, Variant


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


def fmt_ci(half_width: float) -> str:
    """Two significant digits: the interval's own uncertainty makes more noise."""
    return f"{half_width:,.0f}" if half_width >= 100 else f"{half_width:.2g}"


def fmt_ratio(ratio: float) -> str:
    """Two decimals; three when that would round a difference away (1.004 -> 1.004x)."""
    return f"{ratio:.3f}×" if ratio != 1 and abs(ratio - 1) < 0.01 else f"{ratio:.2f}×"


def cell(variant: Variant, key: str) -> str:
    """``mean ± 95% CI half-width``; ``± n/a`` for one seed of a metric that varies with the seed."""
    stat = variant.stats.get(key)
    if stat is None:
        return "–"
    if stat.ci is not None and (stat.ci > 0 or not METRIC_BY_KEY[key].exact):
        return f"{fmt(stat.mean)} ± {fmt_ci(stat.ci)}"
    return fmt(stat.mean) if METRIC_BY_KEY[key].exact else f"{fmt(stat.mean)} ± n/a"


def ratio_cell(variant: Variant, key: str) -> str:
    cmp = variant.comparisons.get(key)
    if cmp is None:
        return "–"
    ratio = fmt_ratio(cmp.ratio)
    if cmp.verdict == "tie":
        return f"≈ ({cmp.ratio:.2f}×)"
    if cmp.verdict == "untested":
        return f"{ratio} (no test)"
    if cmp.significant and not METRIC_BY_KEY[key].exact:
        return f"**{ratio}**"
    return ratio


def shown_metrics(report: Report) -> List[Metric]:
    """Every metric some variant has (size only appears once evaluate.py ran)."""
    return [m for m in METRICS if any(m.key in v.stats for v in report.variants)]


def variant_rows(report: Report) -> List[str]:
    metrics = shown_metrics(report)
    titles = ["variant", "n"] + [t for m in metrics for t in (m.title, "vs base")]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for v in report.variants:
        name = f"`{v.label}`"
        if v is report.baseline:
            name += " (baseline)" if v.ok_jobs else " (baseline: no finished job)"
        cells = [name, str(len(v.ok_jobs))] + [c for m in metrics for c in (cell(v, m.key), ratio_cell(v, m.key))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def legend_lines(report: Report) -> List[str]:
    """How to read the cells, and what is missing (one seed, a failed baseline)."""
    noisy = [m.key for m in shown_metrics(report) if not m.exact]
    seeds = [v.stats[k].n for v in report.variants for k in noisy if k in v.stats]
    text = ("Values: mean ± half-width of the 95% confidence interval over seeds (Student t, n−1 dof); "
            "`± n/a`: one seed, no CI available. \"vs base\" = variant mean / baseline mean: **bold** when "
            f"Welch's t-test against the baseline gives p < {ALPHA:g}, `≈ (ratio)` when it does not (a tie "
            "within the seed spread), `(no test)` when either side has a single seed. "
            "Params and sizes do not vary with the seed (compared exactly).")
    lines = [text, ""]
    if seeds and max(seeds) < 2:
        lines += ["**One seed per variant: no confidence intervals and no significance tests**; differences "
                  "below may be seed noise. Run several seeds (e.g. `seed=1,2,3`) to get them.", ""]
    base = report.baseline
    if base is not None and not base.ok_jobs:
        lines += [f"The baseline `{base.label}` has no finished job (see below): no ratios.", ""]
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
    if report.differences:
        lines += warning_lines(report.differences) + [""]
    if report.common:
        lines += [f"Shared overrides: `{' '.join(report.common)}`.", ""]
    if report.variants:
        lines += legend_lines(report) + variant_rows(report)
    else:
        lines.append("No job finished.")
    return "\n".join(lines + failed_rows(report)) + "\n"


def csv_fields() -> List[str]:
    cols = ["variant", "n", "status", "baseline", "overrides"]
    for m in METRICS:
        k = m.key
        cols += [k, f"{k}_std", f"{k}_ci95", f"{k}_ratio", f"{k}_p", f"{k}_vs_base"]
    return cols


def _variant_record(report: Report, v: Variant) -> dict:
    rec = {"variant": v.label, "n": len(v.ok_jobs), "status": "ok" if v.ok_jobs else "no finished job",
           "baseline": v is report.baseline, "overrides": " ".join(v.overrides)}
    for m in METRICS:
        k, stat, cmp = m.key, v.stats.get(m.key), v.comparisons.get(m.key)
        rec[k] = stat.mean if stat else ""
        rec[f"{k}_std"] = stat.std if stat else ""
        rec[f"{k}_ci95"] = "" if stat is None or stat.ci is None else stat.ci
        rec[f"{k}_ratio"] = cmp.ratio if cmp else ""
        rec[f"{k}_p"] = "" if cmp is None or cmp.p is None else cmp.p
        rec[f"{k}_vs_base"] = cmp.verdict if cmp else ""
    return rec


def write_csv(report: Report, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=csv_fields(), restval="")
        writer.writeheader()
        for v in report.variants:
            writer.writerow(_variant_record(report, v))
        for name, label, reason in report.failed:
            writer.writerow({"variant": label, "n": 0, "status": f"job {name}: {reason}", "baseline": False})
