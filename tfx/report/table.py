"""Group jobs into variants, average over seeds, and compare with a baseline.

A variant is a set of overrides, minus the seed; overrides shared by every job
of the sweep (``model=tiny``, the preset itself) are left out of its label.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from tfx.log.metrics import export_bytes
from tfx.report.runs import JobRecord, ReportError

# (key, column title, source, scale): the columns of every report and of the W&B table.
METRICS = (
    ("val_ppl", "val ppl", "summary", 1.0),
    ("tokens_per_sec", "tokens/s", "summary", 1.0),
    ("peak_mem_mb", "peak mem MB", "summary", 1.0),
    ("params", "params", "summary", 1.0),
    ("size_mb", "size MB", "eval", 1 / 2 ** 20),          # evaluate.py: eval.json size_on_disk_bytes
    ("export_mb", "export MB", "export", 1 / 2 ** 20),    # smallest compressed artefact (*/bytes)
)
SOURCE_KEYS = {"size_mb": "size_on_disk_bytes"}


@dataclass
class Stat:
    mean: float
    std: float
    n: int


@dataclass
class Variant:
    label: str
    overrides: List[str]            # all overrides but the seed
    jobs: List[JobRecord] = field(default_factory=list)
    stats: Dict[str, Stat] = field(default_factory=dict)
    ratios: Dict[str, float] = field(default_factory=dict)

    @property
    def ok_jobs(self) -> List[JobRecord]:
        return [j for j in self.jobs if j.failure is None]


@dataclass
class Report:
    variants: List[Variant]         # those with at least one finished job
    failed: List[tuple]             # (job name, label, reason)
    common: List[str]               # overrides every job shares
    baseline: Optional[Variant]


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


def metric_value(job: JobRecord, key: str, source: str, scale: float) -> Optional[float]:
    if source == "export":
        value = export_bytes(job.summary)
    else:
        record = job.summary if source == "summary" else job.eval
        value = (record or {}).get(SOURCE_KEYS.get(key, key))
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value) * scale


def _stat(values: List[float]) -> Optional[Stat]:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(statistics.fmean(values), std, len(values))


def aggregate(variant: Variant) -> None:
    for key, _, source, scale in METRICS:
        values = [v for j in variant.ok_jobs if (v := metric_value(j, key, source, scale)) is not None]
        stat = _stat(values)
        if stat is not None:
            variant.stats[key] = stat


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
    else the row with the fewest overrides (the first job's on a tie)."""
    if not variants:
        return None
    if wanted:
        match = next((v for v in variants if _same_overrides(v, wanted)), None)
        if match is None:
            labels = ", ".join(repr(v.label) for v in variants)
            raise ReportError(f"--baseline {wanted!r} matches no finished variant; choose one of: {labels}")
        return match
    named = next((v for v in variants if v.label == "baseline"), None)
    return named or min(variants, key=lambda v: len(v.overrides))


def add_ratios(variants: Sequence[Variant], baseline: Optional[Variant]) -> None:
    if baseline is None:
        return
    for variant in variants:
        for key, stat in variant.stats.items():
            base = baseline.stats.get(key)
            if base is not None and base.mean:
                variant.ratios[key] = stat.mean / base.mean


def build_report(jobs: Sequence[JobRecord], baseline: Optional[str] = None) -> Report:
    common = common_overrides(jobs)
    variants = group_variants(jobs, common)
    failed = [(j.name, label_of(j, common), j.failure) for j in jobs if j.failure is not None]
    finished = [v for v in variants if v.ok_jobs]
    base = pick_baseline(finished, baseline)
    add_ratios(finished, base)
    return Report(finished, failed, common, base)
