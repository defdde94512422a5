"""Check that the jobs of a report share what makes rows comparable: data, steps, model.

Each job's composed config (``.hydra/config.yaml``, or the W&B run config) is
flattened, and the keys that decide what a row was trained on and for how long are
compared across all jobs:

* ``data.*`` (the dataset, tokenizer, ``seq_len``; not the cache directory),
* ``model.*``,
* ``trainer.max_steps`` and any ``trainer.budget*`` / ``trainer.target*`` key,
* ``tokens/step`` = ``trainer.batch_size`` x ``trainer.accum_steps`` x ``data.seq_len``
  (batch and accumulation alone may trade off, as the memory preset does).

A key with more than one value is reported with the jobs and variants holding each
value, and whether a variant's own override sets it (a deliberate sweep, e.g.
``model=tiny,small``) or nothing visible does (jobs from different sweeps or code
versions mixed in one directory, or seeds of one variant that do not match).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

TOKENS_PER_STEP = "tokens/step"
_IGNORED = ("data.cache_dir",)


@dataclass
class SettingDifference:
    key: str
    values: List[Tuple[str, List[str], List[str]]]   # (value, variant labels, job names)
    set_by_override: bool                             # some variant's own override sets this key

    def describe(self) -> str:
        parts = []
        for value, labels, jobs in self.values:
            noun = "job" if len(jobs) == 1 else "jobs"
            parts.append(f"{value} in {', '.join(f'`{lab}`' for lab in labels)} ({noun} {', '.join(jobs)})")
        why = "set by the variants' overrides" if self.set_by_override else "no variant override sets it"
        return f"`{self.key}`: " + "; ".join(parts) + f" ({why})"


def flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(tree, Mapping):
        out: Dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _watched(key: str) -> bool:
    if key in _IGNORED:
        return False
    if key.startswith(("data.", "model.")):
        return True
    return key == "trainer.max_steps" or key.startswith(("trainer.budget", "trainer.target"))


def compared_settings(config: Mapping) -> Dict[str, Any]:
    """The watched keys of one job's config (plus the derived ``tokens/step``)."""
    flat = flatten(config)
    out = {k: v for k, v in flat.items() if _watched(k)}
    parts = [flat.get("trainer.batch_size"), flat.get("trainer.accum_steps", 1), flat.get("data.seq_len")]
    if all(isinstance(p, int) and not isinstance(p, bool) for p in parts):
        out[TOKENS_PER_STEP] = parts[0] * parts[1] * parts[2]
    return out


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _set_by(key: str, override_keys: Iterable[str]) -> bool:
    sources = ("trainer.batch_size", "trainer.accum_steps", "data.seq_len") if key == TOKENS_PER_STEP else (key,)
    return any(src == k or src.startswith(k + ".") for src in sources for k in override_keys)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def setting_differences(jobs: Sequence, label_of, common: Sequence[str]) -> List[SettingDifference]:
    """Watched keys whose value is not the same in every job that has a config.

    ``jobs`` are :class:`~tfx.report.runs.JobRecord` s, ``label_of(job, common)`` their row label.
    """
    with_config = [j for j in jobs if j.config]
    if len(with_config) < 2:
        return []
    settings = {j.name: compared_settings(j.config) for j in with_config}
    own_keys = {_override_key(o) for j in with_config for o in j.variant_overrides if o not in common}
    keys: List[str] = []
    for s in settings.values():
        keys += [k for k in s if k not in keys]
    diffs = []
    for key in keys:
        groups: Dict[str, Tuple[List[str], List[str]]] = {}
        for job in with_config:
            labels, names = groups.setdefault(_show(settings[job.name].get(key, "(absent)")), ([], []))
            label = label_of(job, common)
            if label not in labels:
                labels.append(label)
            names.append(job.name)
        if len(groups) > 1:
            values = [(value, labels, names) for value, (labels, names) in groups.items()]
            diffs.append(SettingDifference(key, values, _set_by(key, own_keys)))
    return diffs


def warning_lines(diffs: Sequence[SettingDifference]) -> List[str]:
    if not diffs:
        return []
    return ["**Warning: settings differ between jobs.** Data, steps and model are normally shared "
            "by every row; check that these rows compare like with like:", ""] + \
           [f"- {d.describe()}" for d in diffs]


def one_line(diffs: Sequence[SettingDifference]) -> Optional[str]:
    if not diffs:
        return None
    return "settings differ between jobs: " + ", ".join(
        f"{d.key} ({' vs '.join(v for v, _, _ in d.values)})" for d in diffs)
