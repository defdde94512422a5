"""Quality-vs-cost scatter plots with the Pareto frontier, and training loss curves.

Matplotlib on the Agg backend, so plots are written on headless machines.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tfx.report.table import Report, Variant  # noqa: E402

# (file name, x metric, x title, True when a larger x is better)
TRADE_OFFS = (
    ("ppl_vs_throughput.png", "tokens_per_sec", "throughput (tokens/s, higher is better)", True),
    ("ppl_vs_memory.png", "peak_mem_mb", "peak memory (MB, lower is better)", False),
)


def pareto_front(points: Sequence[tuple], x_higher_better: bool) -> List[int]:
    """Indices of the points no other point beats on both axes (y: lower is better)."""
    def beats(a, b):
        better_x = a[0] >= b[0] if x_higher_better else a[0] <= b[0]
        return better_x and a[1] <= b[1] and a != b
    return [i for i, p in enumerate(points) if not any(beats(q, p) for q in points)]


def _points(variants: Sequence[Variant], x_key: str):
    kept = [v for v in variants if x_key in v.stats and "val_ppl" in v.stats]
    return kept, [(v.stats[x_key].mean, v.stats["val_ppl"].mean) for v in kept]


def plot_trade_off(report: Report, path: Path, x_key: str, x_title: str, higher_better: bool) -> bool:
    variants, points = _points(report.variants, x_key)
    if not points:
        return False
    front = set(pareto_front(points, higher_better))
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (v, (x, y)) in enumerate(zip(variants, points)):
        on_front = i in front
        ax.errorbar(x, y, xerr=v.stats[x_key].std or None, yerr=v.stats["val_ppl"].std or None,
                    fmt="o", color="tab:red" if on_front else "tab:gray", ms=8 if on_front else 6)
        ax.annotate(v.label + (" (base)" if v is report.baseline else ""), (x, y), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    frontier = sorted((points[i] for i in front), key=lambda p: p[0])
    ax.plot([p[0] for p in frontier], [p[1] for p in frontier], "--", color="tab:red", label="Pareto frontier")
    ax.set(xlabel=x_title, ylabel="validation perplexity (lower is better)", title="quality vs cost")
    ax.ticklabel_format(useOffset=False, style="plain")
    ys = [p[1] for p in points]
    mid, spread = (max(ys) + min(ys)) / 2, max(ys) - min(ys)
    if spread < 0.01 * abs(mid):  # equal quality: show +-1% instead of float round-off
        ax.set_ylim(mid - 0.01 * abs(mid), mid + 0.01 * abs(mid))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_loss_curves(report: Report, path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = False
    for i, v in enumerate(report.variants):
        color = f"C{i % 10}"
        for k, job in enumerate(j for j in v.jobs if j.curve):
            steps, losses = zip(*job.curve)
            ax.plot(steps, losses, color=color, alpha=0.8, label=v.label if k == 0 else None,
                    marker="o" if len(steps) < 20 else None, ms=3)  # short runs: show the points
            drawn = True
    if drawn:
        ax.set(xlabel="optimizer step", ylabel="train loss", title="training loss (one line per seed)")
        ax.ticklabel_format(useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def write_plots(report: Report, out_dir: Path) -> List[Path]:
    written = []
    for name, key, title, higher in TRADE_OFFS:
        if plot_trade_off(report, out_dir / name, key, title, higher):
            written.append(out_dir / name)
    if plot_loss_curves(report, out_dir / "loss_curves.png"):
        written.append(out_dir / "loss_curves.png")
    return written
