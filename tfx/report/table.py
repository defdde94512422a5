"""Group jobs into variants, average over seeds, and compare with a baseline.

A variant is a set of overrides, minus the seed; overrides shared by every job
of the sweep (``model=tiny``, the preset itself) are left out of its label.
Per variant and metric: the mean over seeds, its 95% confidence interval (Student t,
n-1 dof) and, against the baseline, the ratio of means and Welch's t-test; a
difference counts only when p < 0.05 (otherwise it is a tie).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from tfx.log.metrics import export_bytes
from tfx.report.runs import JobRecord, ReportError
from tfx.report.settings import SettingDifference, setting_differences
from tfx.report.stats import mean_ci, welch



@dataclass(frozen=True)
class Metric:
    key: str
    title: str            # column title
    source: str           # "summary", "eval" (evaluate.py) or "export" (smallest compressed artefact)
    scale: float = 1.0
    exact: bool = False   # the same for every seed (params, sizes): compared exactly, no test
    lower_is_better: Optional[bool] = True


# The columns of every report (and of the W&B table); a column shows when a variant has it.
METRICS = (
    Metric("val_ppl", "val ppl", "summary"),
    Metric("val_bpb", "val bits/byte", "summary"),
    Metric("tokens_per_sec", "tokens/s", "summary", lower_is_better=False),
    Metric("peak_mem_mb", "peak mem MB", "summary"),
    Metric("params", "params", "summary", exact=True),
    Metric("size_mb", "size MB", "eval", 1 / 2 ** 20, exact=True),      # evaluate.py: size_on_disk_bytes
    Metric("export_mb", "export MB", "export", 1 / 2 ** 20, exact=True),  # smallest compressed artefact
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
SOURCE_KEYS = {"size_mb": "size_on_disk_bytes"}
ALPHA = 0.05           # significance level of the Welch test against the baseline
CI_LEVEL = 0.95


@dataclass
class Stat:
    mean: float
    std: float                  # sample std over seeds (0 with one seed)
    n: int
    values: List[float] = field(default_factory=list)
    ci: Optional[float] = None  # half-width of the 95% CI of the mean; None with one seed


@dataclass
class Comparison:
    """One metric of a variant against the baseline."""
    ratio: float                # variant mean / baseline mean
    verdict: str                # "baseline", "higher", "lower", "tie", "same", "untested"
    p: Optional[float] = None   # Welch's t-test, two-sided (None: exact metric or < 2 seeds)

    @property
    def significant(self) -> bool:
        return self.verdict in ("higher", "lower")


@dataclass
class Variant:
    label: str
    overrides: List[str]            # all overrides but the seed
    jobs: List[JobRecord] = field(default_factory=list)
    stats: Dict[str, Stat] = field(default_factory=dict)
    ratios: Dict[str, float] = field(default_factory=dict)
    comparisons: Dict[str, Comparison] = field(default_factory=dict)

    @property
    def ok_jobs(self) -> List[JobRecord]:
        return [j for j in self.jobs if j.failure is None]


@dataclass
class Report:
    variants: List[Variant]         # the baseline first, then those with a finished job
    failed: List[tuple]             # (job name, label, reason)
    common: List[str]               # overrides every job shares
    baseline: Optional[Variant]     # may have no finished job (its row then says so)
    differences: List[SettingDifference] = field(default_factory=list)   # data/steps/model that differ


def common_overrides(jobs: Sequence[JobRecord]) -> List[str]:
    sets = [set(j.variant_overrides) for j in jobs]
    shared = set.intersection(*sets) if sets else set()
    return [o for o in jobs[0].variant_overrides if o in shared] if jobs else []


def short(override: str) -> str:
    """``+experiment/accum=bs4_accum4`` -> ``accum=bs4_accum4``: presets' variant groups read
    like plain overrides in labels."""
    override = override.lstrip("+~")
    return override[len("experiment/"):] if override.startswith("experiment/") else override


def label_of(job: JobRecord, common: Sequence[str]) -> str:
    own = [short(o) for o in job.variant_overrides if o not in common]
    return " ".join(own) or "baseline"


def metric_value(job: JobRecord, metric: Metric) -> Optional[float]:
    if metric.source == "export":
        value = export_bytes(job.summary)
    else:
        record = job.summary if metric.source == "summary" else job.eval
        value = (record or {}).get(SOURCE_KEYS.get(metric.key, metric.key))
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value) * metric.scale


def make_stat(values: List[float]) -> Optional[Stat]:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(statistics.fmean(values), std, len(values), list(values), mean_ci(values, CI_LEVEL))


def aggregate(variant: Variant) -> None:
    for metric in METRICS:
        values = [v for j in variant.ok_jobs if (v := metric_value(j, metric)) is not None]
        stat = make_stat(values)
        if stat is not None:
            variant.stats[metric.key] = stat


def group_variants(jobs: Sequence[JobRecord], common: Sequence[str]) -> List[Variant]:
    by_label: Dict[str, Variant] = {}
    for job in jobs:
        label = label_of(job, common)
        by_label.setdefault(label, Variant(label, job.variant_overrides)).jobs.append(job)
    for variant in by_label.values():
        aggregate(variant)
    return list(by_label.values())


def _same_overrides(variant: Variant, wanted: str) -> bool:
    tokens = set(wanted.replace(",", " ").split())
    return wanted == variant.label or tokens == set(variant.label.split()) or tokens == set(variant.overrides)


def pick_baseline(variants: Sequence[Variant], wanted: Optional[str] = None) -> Optional[Variant]:
    """``wanted`` (a label, or its overrides in any order), else a row labelled 'baseline',
    else the row with the fewest overrides (the first job's on a tie). ``wanted`` may name
    a variant without a finished job: its row comes first and says so (no ratios); the
    default is chosen among the variants with a finished job."""
    if not variants:
        return None
    if wanted:
        match = next((v for v in variants if _same_overrides(v, wanted)), None)
        if match is None:
            labels = ", ".join(repr(v.label) for v in variants)
            raise ReportError(f"--baseline {wanted!r} matches no variant; choose one of: {labels}")
        return match
    finished = [v for v in variants if v.ok_jobs]
    if not finished:
        return None
    named = next((v for v in finished if v.label == "baseline"), None)
    return named or min(finished, key=lambda v: len(v.overrides))


def compare(stat: Stat, base: Stat, metric: Metric, alpha: float = ALPHA) -> Optional[Comparison]:
    if not base.mean:
        return None
    ratio = stat.mean / base.mean
    if metric.exact:
        return Comparison(ratio, "same" if stat.mean == base.mean else ("higher" if ratio > 1 else "lower"))
    test = welch(stat.values, base.values)
    if test is None:
        return Comparison(ratio, "untested")
    if test.p >= alpha:
        return Comparison(ratio, "tie", test.p)
    return Comparison(ratio, "higher" if stat.mean > base.mean else "lower", test.p)


def add_ratios(variants: Sequence[Variant], baseline: Optional[Variant]) -> None:
    if baseline is None:
        return
    for variant in variants:
        for key, stat in variant.stats.items():
            base = baseline.stats.get(key)
            if base is None:
                continue
            if variant is baseline:
                variant.comparisons[key] = Comparison(1.0, "baseline")
                variant.ratios[key] = 1.0
            elif (cmp := compare(stat, base, METRIC_BY_KEY[key])) is not None:
                variant.comparisons[key] = cmp
                variant.ratios[key] = cmp.ratio


def build_report(jobs: Sequence[JobRecord], baseline: Optional[str] = None) -> Report:
    common = common_overrides(jobs)
    variants = group_variants(jobs, common)
    failed = [(j.name, label_of(j, common), j.failure) for j in jobs if j.failure is not None]
    base = pick_baseline(variants, baseline)
    shown = ([base] if base is not None else []) + [v for v in variants if v.ok_jobs and v is not base]
    add_ratios(shown, base)
    return Report(shown, failed, common, base, setting_differences(jobs, label_of, common))
