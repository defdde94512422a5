"""Quality-vs-cost plots with a tie-aware Pareto frontier, and training/validation loss curves.

Matplotlib on the Agg backend, so plots are written on headless machines.

* Axes are ratios to the baseline (1.0 = the baseline, dotted lines), never zoomed to
  less than +-10% around it: a 3% gap looks like 3%, not like the whole plot.
* Error bars are the 95% confidence intervals over seeds (divided by the baseline mean).
* The frontier counts a difference only when it is real: Welch's t-test p < 0.05 between
  the two variants' seeds, or, with a single seed on either side, a relative gap above
  0.5%. Variants that tie on both axes are both on the frontier.
* Every variant has its own number, colour and marker; the plot shows the numbers (points
  at the same place share one label, "1, 3") and the legend beside it the names.
* Loss curves: training and validation side by side, one line per variant (the mean over
  seeds, the band spans the seeds), each with its own line style and marker, and curves
  that coincide are named in the panel ("3 = 1").
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from tfx.report.stats import differs  # noqa: E402
from tfx.report.table import ALPHA, Report, Stat, Variant  # noqa: E402

QUALITY = ("val_ppl", "val ppl")
# (file name, x metric, x name and unit, True when a larger x is better)
TRADE_OFFS = (
    ("ppl_vs_throughput.png", "tokens_per_sec", "throughput, tokens/s", True),
    ("ppl_vs_memory.png", "peak_mem_mb", "peak memory, MB", False),
)
REL_TOL = 0.005          # with one seed: a smaller relative gap is a tie
MIN_HALF_SPAN = 0.10     # ratio axes show at least 0.9..1.1
CURVE_REL_TOL = 1e-4     # loss curves this close everywhere are "identical"
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "h", "p", "*")
LINESTYLES = ("-", "--", "-.", ":")
DPI = 120


def _values(coord) -> List[float]:
    return list(coord) if isinstance(coord, (list, tuple)) else [float(coord)]


def _better(a, b, higher_is_better: bool, rel_tol: float) -> bool:
    """``a`` is better than ``b`` by more than the seed spread (or ``rel_tol`` with one seed)."""
    va, vb = _values(a), _values(b)
    if not differs(va, vb, ALPHA, rel_tol):
        return False
    ma, mb = statistics.fmean(va), statistics.fmean(vb)
    return ma > mb if higher_is_better else ma < mb


def pareto_front(points: Sequence[tuple], x_higher_better: bool, rel_tol: float = REL_TOL) -> List[int]:
    """Indices of the points that no other point beats: at least as good on both axes (a tie
    counts as "as good") and better on one. y: lower is better. A coordinate is a number
    (one seed: differences up to ``rel_tol`` are ties) or a list of per-seed values (ties:
    Welch's t-test p >= 0.05)."""
    def beats(a, b):
        x_better = _better(a[0], b[0], x_higher_better, rel_tol)
        y_better = _better(a[1], b[1], False, rel_tol)
        x_worse = _better(b[0], a[0], x_higher_better, rel_tol)
        y_worse = _better(b[1], a[1], False, rel_tol)
        return not x_worse and not y_worse and (x_better or y_better)
    return [i for i, p in enumerate(points) if not any(beats(q, p) for j, q in enumerate(points) if j != i)]


def ratio_limits(values: Sequence[float], errors: Sequence[float], center: float = 1.0,
                 min_half_span: float = MIN_HALF_SPAN) -> Tuple[float, float]:
    """Axis limits that hold every point with its error bar and ``center`` (the baseline),
    and span at least ``center * (1 +- min_half_span)``. Never below 0 when every value is
    positive (a wide two-seed interval of a throughput would otherwise reach -4x)."""
    lo = min([center * (1 - min_half_span)] + [v - e for v, e in zip(values, errors)])
    hi = max([center * (1 + min_half_span)] + [v + e for v, e in zip(values, errors)])
    pad = 0.06 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if all(v > 0 for v in values) and center > 0:
        lo = max(lo, 0.0)
    return lo, hi


def _style(i: int) -> dict:
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]}


def _legend_name(report: Report, v: Variant) -> str:
    return v.label + (" (baseline)" if v is report.baseline else "")


def _clusters(pixels: Sequence[Tuple[float, float]], radius: float = 8.0) -> List[List[int]]:
    """Groups of points closer than ``radius`` pixels (chained): they get one label."""
    groups: List[List[int]] = []
    for i, (x, y) in enumerate(pixels):
        near = [g for g in groups if any(abs(x - pixels[j][0]) < radius and abs(y - pixels[j][1]) < radius
                                         for j in g)]
        merged = [i] + [j for g in near for j in g]
        groups = [g for g in groups if g not in near] + [sorted(merged)]
    return sorted(groups)


# Label offsets tried in turn (points), with their alignment: right-up first.
_OFFSETS = ((7, 7, "left", "bottom"), (7, -7, "left", "top"), (-7, 7, "right", "bottom"),
            (-7, -7, "right", "top"), (0, 11, "center", "bottom"), (0, -11, "center", "top"),
            (12, 0, "left", "center"), (-12, 0, "right", "center"), (16, 16, "left", "bottom"),
            (-16, -16, "right", "top"), (16, -16, "left", "top"), (-16, 16, "right", "bottom"))


def place_labels(ax, xy: Sequence[Tuple[float, float]], texts: Dict[int, str], fontsize: float = 9) -> list:
    """Number labels next to the points, clustered and moved until none overlaps another
    label or a point (greedy over :data:`_OFFSETS`; the least-overlapping one otherwise)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    pixels = [tuple(ax.transData.transform(p)) for p in xy]
    half = 7.0  # marker half-size in pixels
    obstacles = [(px - half, py - half, px + half, py + half) for px, py in pixels]
    axes_box = ax.get_window_extent(renderer)
    placed = []
    for group in _clusters(pixels):
        group = sorted(group, key=lambda i: pixels[i])     # left to right, as on the plot
        text = ", ".join(texts[i] for i in group)
        anchor = xy[group[0]]
        best = None
        for dx, dy, ha, va in _OFFSETS:
            ann = ax.annotate(text, anchor, xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              fontsize=fontsize, fontweight="bold", zorder=5,
                              bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
            box = ann.get_window_extent(renderer)
            extent = (box.x0, box.y0, box.x1, box.y1)
            overlap = sum(_overlap(extent, o) for o in obstacles)
            # a label nearer to another point than to its own would name the wrong point
            cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
            own = min(abs(cx - pixels[i][0]) + abs(cy - pixels[i][1]) for i in group)
            other = min((abs(cx - px) + abs(cy - py) for j, (px, py) in enumerate(pixels) if j not in group),
                        default=float("inf"))
            overlap += 500.0 * (other < own)
            outside = (box.x0 < axes_box.x0) + (box.x1 > axes_box.x1) + (box.y0 < axes_box.y0) + (box.y1 > axes_box.y1)
            score = overlap + 1e6 * outside
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, ann, extent)
            else:
                ann.remove()
            if score == 0:
                break
        obstacles.append(best[2])
        placed.append(best[1])
    return placed


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _ratio_axis(ax, axis: str, reference: Optional[float]) -> None:
    target = ax.xaxis if axis == "x" else ax.yaxis
    if reference:   # round steps (0.05, 0.1, 0.2, ...): two decimals always suffice
        target.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2f}×"))
    else:
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.4g}"))


def _scaled(stat: Stat, ref: float) -> Tuple[float, float, List[float]]:
    return stat.mean / ref, (stat.ci or 0.0) / ref, [v / ref for v in stat.values]


def plot_trade_off(report: Report, path: Path, x_key: str, x_name: str, higher_better: bool) -> bool:
    q_key, q_name = QUALITY
    variants = [v for v in report.variants if x_key in v.stats and q_key in v.stats]
    if not variants:
        return False
    base = report.baseline
    ratios = base is not None and x_key in base.stats and q_key in base.stats
    x_ref = base.stats[x_key].mean if ratios else 1.0
    y_ref = base.stats[q_key].mean if ratios else 1.0
    xs = [_scaled(v.stats[x_key], x_ref) for v in variants]
    ys = [_scaled(v.stats[q_key], y_ref) for v in variants]
    front = set(pareto_front([(x[2], y[2]) for x, y in zip(xs, ys)], higher_better))

    fig, ax = plt.subplots(figsize=(7, 5.5))
    numbers, handles = {}, []
    for i, (v, x, y) in enumerate(zip(variants, xs, ys)):
        idx = report.variants.index(v)
        numbers[i] = str(idx + 1)
        style = _style(idx)
        filled = i in front
        marker = dict(marker=style["marker"], color=style["color"], mfc=style["color"] if filled else "white",
                      mec=style["color"], mew=1.8, ms=9)
        ax.errorbar(x[0], y[0], xerr=x[1] or None, yerr=y[1] or None, capsize=3, elinewidth=1.2, zorder=3,
                    ls="none", **marker)
        handles.append(Line2D([], [], ls="none", label=f"{idx + 1}  {_legend_name(report, v)}"
                              + ("  [Pareto]" if filled else ""), **marker))
    frontier = sorted((xs[i][0], ys[i][0]) for i in front)
    if len(frontier) > 1:
        handles += ax.plot(*zip(*frontier), "--", color="tab:red", lw=1.2, zorder=2,
                           label="Pareto frontier (filled markers)")
    if ratios:
        ax.axvline(1.0, color="0.55", ls=":", lw=1, zorder=1)
        ax.axhline(1.0, color="0.55", ls=":", lw=1, zorder=1)
    x_center = 1.0 if ratios else statistics.fmean(x[0] for x in xs)
    y_center = 1.0 if ratios else statistics.fmean(y[0] for y in ys)
    ax.set_xlim(*ratio_limits([x[0] for x in xs], [x[1] for x in xs], x_center))
    ax.set_ylim(*ratio_limits([y[0] for y in ys], [y[1] for y in ys], y_center))
    _ratio_axis(ax, "x", x_ref if ratios else None)
    _ratio_axis(ax, "y", y_ref if ratios else None)
    direction = "higher is better →" if higher_better else "← lower is better"
    what, unit = x_name.split(", ") if ", " in x_name else (x_name, "")
    if ratios:
        ax.set_xlabel(f"{what} ÷ baseline (1.00× = {x_ref:,.4g} {unit}); {direction}")
        ax.set_ylabel(f"{q_name} ÷ baseline (1.00× = {y_ref:,.4g}); ↓ lower is better")
        ax.set_title(f"quality vs {what}, relative to the baseline: {base.label}", fontsize=10)
    else:
        ax.set_xlabel(f"{what}, {unit}; {direction}" if unit else f"{what}; {direction}")
        ax.set_ylabel(f"{q_name}; ↓ lower is better")
        ax.set_title(f"quality vs {what} (the baseline has no result: absolute values)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.annotate("Error bars: 95% CI over seeds. Pareto: not beaten on both axes; a gap within the seed "
                f"spread\n(Welch p ≥ {ALPHA:g}) or, with one seed, within {REL_TOL:.1%} is a tie. "
                "Hollow markers: beaten by another variant.",
                (0, 0), xycoords="axes fraction", xytext=(0, -48), textcoords="offset points",
                fontsize=7.5, color="0.3", va="top")
    fig.tight_layout()
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=8,
              frameon=False, title="number on the plot, variant", title_fontsize=8, alignment="left")
    place_labels(ax, [(x[0], y[0]) for x, y in zip(xs, ys)], numbers)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return True


def mean_curve(curves: Sequence[Sequence[tuple]]) -> Tuple[List[float], List[float], List[float], List[float]]:
    """(steps, mean, min, max) over the seeds that logged each step."""
    by_step: Dict[float, List[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps],
            [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])


def same_curve(a: tuple, b: tuple, rel_tol: float = CURVE_REL_TOL) -> bool:
    """Two (steps, mean, ...) curves logged at the same steps and equal within ``rel_tol``."""
    if a[0] != b[0] or not a[0]:
        return False
    return all(abs(x - y) <= rel_tol * max(abs(x), abs(y), 1e-12) for x, y in zip(a[1], b[1]))


def _curve_panel(ax, report: Report, attr: str, title: str) -> bool:
    drawn = []   # (number, curve)
    twins: Dict[int, List[int]] = {}
    for idx, v in enumerate(report.variants):
        curves = [getattr(j, attr) for j in v.jobs if getattr(j, attr)]
        if not curves:
            continue
        curve = mean_curve(curves)
        steps, mean, lo, hi = curve
        style = _style(idx)
        every = max(1, len(steps) // 8)
        ax.plot(steps, mean, color=style["color"], marker=style["marker"], ls=LINESTYLES[idx % len(LINESTYLES)],
                lw=max(1.0, 2.4 - 0.35 * (idx % 4)), ms=6, mfc="white" if idx % 2 else style["color"],
                markevery=(idx % every, every), label=f"{idx + 1}  {_legend_name(report, v)}", zorder=3)
        if len(curves) > 1:
            ax.fill_between(steps, lo, hi, color=style["color"], alpha=0.12, lw=0)
        twin = next((n for n, c in drawn if same_curve(c, curve)), None)
        if twin is not None:
            twins.setdefault(twin, [twin]).append(idx + 1)
        else:
            drawn.append((idx + 1, curve))
    if not drawn:
        ax.set_visible(False)
        return False
    ax.set(xlabel="optimizer step", ylabel=title, title=title + " (mean over seeds; band: min–max)")
    ax.title.set_fontsize(10)
    ax.ticklabel_format(useOffset=False, style="plain", axis="y")
    ax.grid(alpha=0.3)
    if twins:
        notes = "; ".join(" = ".join(map(str, group)) for group in twins.values())
        ax.text(0.02, 0.02, f"identical curves (within {CURVE_REL_TOL:.2%}): {notes}", transform=ax.transAxes,
                fontsize=8, va="bottom", bbox=dict(boxstyle="round,pad=0.3", fc="lightyellow", ec="0.7"), zorder=6)
    return True


def plot_loss_curves(report: Report, path: Path) -> bool:
    has_val = any(j.val_curve for v in report.variants for j in v.jobs)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(12, 4.8) if has_val else (7, 4.8), squeeze=False)
    drawn = _curve_panel(axes[0][0], report, "curve", "training loss")
    if has_val:
        drawn = _curve_panel(axes[0][1], report, "val_curve", "validation loss") or drawn
    if drawn:
        visible = [a for a in axes[0] if a.get_visible()]
        legend: Dict[str, object] = {}
        for a in visible:
            for handle, label in zip(*a.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        labels = sorted(legend, key=lambda lab: int(lab.split()[0]))
        handles = [legend[lab] for lab in labels]
        fig.tight_layout()
        visible[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                           fontsize=8, frameon=False)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
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
