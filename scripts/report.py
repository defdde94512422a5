"""Compare the jobs of a sweep: Markdown + CSV table and Pareto plots.

    python scripts/report.py multirun/2026-01-01/12-00-00
    python scripts/report.py multirun/... --baseline "precision=fp32 compile=false" --out reports/precision
    python scripts/report.py --wandb my-entity/tfx --group multirun_2026-01-01_12-00-00 --out reports/x

Writes report.md, report.csv, ppl_vs_throughput.png, ppl_vs_memory.png and
loss_curves.png into the sweep directory (or --out): per variant the mean over seeds
with its 95% confidence interval, the ratio to the baseline and Welch's t-test against
it. Warns when the jobs' data, steps or model differ. See docs/report.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tfx.report.runs import optuna_note  # noqa: E402
from tfx.report.settings import one_line  # noqa: E402
from tfx.report import ReportError, build_report, load_sweep, to_markdown, write_csv  # noqa: E402
from tfx.report.plots import write_plots  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep_dir", nargs="?", help="Hydra multirun directory (holds 0/, 1/, ... job dirs)")
    p.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B instead (needs network)")
    p.add_argument("--group", help="with --wandb: only this W&B group (a sweep)")
    p.add_argument("--baseline", help="variant label (its overrides, any order) to divide by; "
                                      "default: a row labelled 'baseline', else the one with fewest overrides")
    p.add_argument("--out", type=Path, help="output directory (default: the sweep directory)")
    p.add_argument("--no-plots", action="store_true", help="only the tables")
    args = p.parse_args(argv)
    if bool(args.sweep_dir) == bool(args.wandb):
        p.error("give either a multirun directory or --wandb ENTITY/PROJECT")
    if args.wandb and not args.out:
        p.error("--wandb needs --out DIR for the report files")
    return args


def run(args: argparse.Namespace, command: str) -> Path:
    if args.wandb:
        from tfx.report.wandb_source import load_wandb

        jobs = load_wandb(args.wandb, args.group)
    else:
        jobs = load_sweep(args.sweep_dir)
    report = build_report(jobs, baseline=args.baseline)
    out = args.out or Path(args.sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    note = None if args.wandb else optuna_note(args.sweep_dir)
    markdown = to_markdown(report, command, notes=[note] if note else [])
    (out / "report.md").write_text(markdown)
    write_csv(report, out / "report.csv")
    plots = [] if args.no_plots else write_plots(report, out)
    print(markdown)
    if report.differences:
        print(f"warning: {one_line(report.differences)} (details in report.md)", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in [out / "report.md", out / "report.csv", *plots]))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        run(args, "python scripts/report.py " + shlex.join(argv))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
