"""The report's seed statistics against scipy.stats, and what the table and plots make of them:
95% CIs (Student t, n-1 dof), Welch's t-test, ties within the seed spread, the baseline row,
tie-aware Pareto fronts, ratio axes, legible labels, loss curves and differing settings.

No training: every report here is built from JobRecords with fixed numbers (fast)."""
import csv
import math
import statistics

import pytest

from tfx.report import JobRecord, build_report, to_markdown, write_csv
from tfx.report.plots import (mean_curve, pareto_front, place_labels, plot_loss_curves, plot_trade_off,
                              ratio_limits, same_curve, write_plots)
from tfx.report.settings import compared_settings, setting_differences
from tfx.report.stats import betainc, differs, mean_ci, t_ppf, t_two_sided_p, welch
from tfx.report.table import label_of

SAMPLES = [
    ([10.1, 10.4, 9.8], [10.6, 10.9, 11.3]),
    ([449.536664, 449.536679], [449.6, 449.4, 449.55, 449.52]),
    ([1.0, 2.0], [3.0, 5.0, 4.0, 6.0, 5.5]),
    ([3248.0, 3301.0, 3190.0, 3275.0], [3700.0, 3650.0, 3811.0]),
    ([0.51, 0.49, 0.5, 0.52, 0.48, 0.5, 0.47], [0.5, 0.53]),
    ([1e-3, 2e-3, 1.5e-3], [1e3, 1.01e3, 0.99e3]),          # very different scales: p ~ 1e-5
]


# ---------------------------------------------------------------- against scipy.stats

def test_t_quantile_known_values():
    """The 97.5% quantiles every 95% CI of 2..5 seeds uses (scipy.stats.t.ppf, without scipy)."""
    for df, expected in ((1, 12.706204736174694), (2, 4.302652729749462), (3, 3.1824463052837078),
                         (4, 2.7764451051977934)):
        assert t_ppf(0.975, df) == pytest.approx(expected, rel=1e-10)
    assert t_ppf(0.5, 3) == 0.0 and t_ppf(0.025, 2) == pytest.approx(-4.302652729749462, rel=1e-10)


def test_t_quantile_and_tail_match_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 9, 29, 100, 0.7, 2.5, 3.9046711):
        for q in (0.001, 0.025, 0.1, 0.4, 0.6, 0.9, 0.95, 0.975, 0.995, 0.9995):
            assert t_ppf(q, df) == pytest.approx(st.t.ppf(q, df), rel=1e-9, abs=1e-12), (q, df)
        for t in (0.0, 0.3, 1.0, 2.5, 7.0, 40.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * st.t.sf(t, df), rel=1e-9, abs=1e-300), (t, df)


def test_betainc_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b in ((0.5, 0.5), (1.0, 0.5), (2.5, 0.5), (15.0, 0.5), (3.0, 7.0)):
        for x in (0.0, 1e-6, 0.1, 0.5, 0.9, 0.999999, 1.0):
            assert betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10, abs=1e-15)


@pytest.mark.parametrize("a,b", SAMPLES)
def test_ci_half_width_matches_scipy(a, b):
    st = pytest.importorskip("scipy.stats")
    for values in (a, b):
        n = len(values)
        expected = st.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
        assert mean_ci(values) == pytest.approx(expected, rel=1e-10)
        low, high = st.t.interval(0.95, n - 1, loc=statistics.fmean(values), scale=st.sem(values))
        assert mean_ci(values) == pytest.approx((high - low) / 2, rel=1e-10)
    assert mean_ci([5.0]) is None


@pytest.mark.parametrize("a,b", SAMPLES)
def test_welch_matches_scipy(a, b):
    st = pytest.importorskip("scipy.stats")
    ref = st.ttest_ind(a, b, equal_var=False)
    got = welch(a, b)
    assert got.t == pytest.approx(ref.statistic, rel=1e-10)
    assert got.p == pytest.approx(ref.pvalue, rel=1e-9)
    if hasattr(ref, "df"):
        assert got.df == pytest.approx(ref.df, rel=1e-10)


def test_welch_fixed_value_and_edge_cases():
    got = welch([10.1, 10.4, 9.8], [10.6, 10.9, 11.3])   # scipy: t=-3.125, p=0.036538253751892034
    assert got.t == pytest.approx(-3.125) and got.p == pytest.approx(0.036538253751892034, rel=1e-9)
    assert welch([1.0], [1.0, 2.0]) is None                # one seed: no test
    assert welch([2.0, 2.0], [2.0, 2.0]).p == 1.0          # no spread, same mean (scipy: nan)
    assert welch([2.0, 2.0], [3.0, 3.0]).p == 0.0          # no spread, different means
    assert not differs([449.536664], [449.536679])         # one seed: relative tolerance
    assert differs([100.0], [101.0])
    assert not differs([449.536664] * 2, [449.536679] * 2)  # deterministic seeds: float noise is a tie


# ---------------------------------------------------------------- the table

def _job(name, overrides, ppl, tps=1000.0, mem=100.0, **extra):
    summary = {"val_ppl": ppl, "tokens_per_sec": tps, "peak_mem_mb": mem, "params": 10,
               "step": 5, "max_steps": 5, "stopped_early": None, "device": "cpu", **extra}
    return JobRecord(name, overrides, summary=summary)


def _seeds(variant, ppls, tpss, start=0):
    return [_job(str(start + i), [variant, f"seed={i + 1}"], p, t) for i, (p, t) in enumerate(zip(ppls, tpss))]


def test_ties_within_seed_spread_and_significant_differences(tmp_path):
    base_ppl, base_tps = [10.1, 10.4, 9.8], [3248.0, 3301.0, 3190.0]
    jobs = (_seeds("p=fp32", base_ppl, base_tps)
            + _seeds("p=bf16", [10.3, 9.9, 10.2], [3700.0, 3650.0, 3811.0], 3)   # ppl: same; speed: faster
            + _seeds("p=fp16", [10.6, 10.9, 11.3], [3200.0, 3330.0, 3150.0], 6))  # ppl: worse (p=0.037)
    report = build_report(jobs)
    assert [v.label for v in report.variants] == ["p=fp32", "p=bf16", "p=fp16"]
    by = {v.label: v for v in report.variants}
    st = by["p=fp32"].stats["val_ppl"]
    assert st.ci == pytest.approx(4.302652729749462 * statistics.stdev(base_ppl) / math.sqrt(3), rel=1e-9)
    assert by["p=bf16"].comparisons["val_ppl"].verdict == "tie"
    assert by["p=bf16"].comparisons["tokens_per_sec"].verdict == "higher"
    fp16 = by["p=fp16"].comparisons["val_ppl"]
    assert fp16.verdict == "higher" and fp16.p == pytest.approx(0.036538253751892034, rel=1e-9)
    assert by["p=fp16"].comparisons["tokens_per_sec"].verdict == "tie"
    assert by["p=fp32"].comparisons["val_ppl"].verdict == "baseline"

    md = to_markdown(report, "cmd")
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| `")}
    assert rows["`p=fp32` (baseline)"].count("1.00×") == 4
    bf16 = [c.strip() for c in rows["`p=bf16`"].split("|")]
    assert bf16[4].startswith("≈") and bf16[6] == "**1.15×**"     # ppl tie, speed significant
    assert "10.13 ± 0.52" in rows["`p=bf16`"]                      # mean ± 95% CI half-width
    fp16 = [c.strip() for c in rows["`p=fp16`"].split("|")]
    assert fp16[4] == "**1.08×**" and fp16[6].startswith("≈")

    write_csv(report, tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as fh:
        csv_rows = {r["variant"]: r for r in csv.DictReader(fh)}
    assert float(csv_rows["p=fp16"]["val_ppl_p"]) == pytest.approx(0.036538253751892034, rel=1e-9)
    assert csv_rows["p=bf16"]["val_ppl_vs_base"] == "tie"
    assert float(csv_rows["p=fp32"]["val_ppl_ci95"]) == pytest.approx(st.ci)


def test_baseline_row_first_with_one_seed_and_no_ci_said():
    jobs = (_seeds("p=bf16", [10.3, 9.9], [3700.0, 3650.0]) + [_job("9", ["p=fp32", "seed=1"], 10.0, 3000.0)])
    report = build_report(jobs, baseline="p=fp32")
    assert report.variants[0].label == "p=fp32" and report.variants[0] is report.baseline
    md = to_markdown(report, "cmd")
    base_row = next(line for line in md.splitlines() if line.startswith("| `p=fp32` (baseline)"))
    assert "10 ± n/a" in base_row and "| 1 |" in base_row
    other = next(line for line in md.splitlines() if line.startswith("| `p=bf16`"))
    assert "(no test)" in other and "10.1 ± 2.5" in other
    single = to_markdown(build_report([_job("0", ["p=a"], 10.0), _job("1", ["p=b"], 11.0)]), "cmd")
    assert "One seed per variant: no confidence intervals" in single


def test_baseline_without_finished_job_still_first():
    failed = JobRecord("0", ["p=fp32"], summary=None)
    report = build_report([failed, _job("1", ["p=bf16"], 10.0)], baseline="p=fp32")
    assert report.variants[0].label == "p=fp32" and not report.variants[0].ok_jobs
    md = to_markdown(report, "cmd")
    assert "`p=fp32` (baseline: no finished job)" in md and "no ratios" in md
    assert report.variants[1].comparisons == {}
    assert build_report([failed, _job("1", ["p=bf16"], 10.0)]).baseline.label == "p=bf16"  # default: finished


def test_bits_per_byte_column_when_summaries_have_it():
    jobs = [_job("0", ["p=a"], 10.0, val_bpb=1.25), _job("1", ["p=b"], 10.0, val_bpb=1.5)]
    md = to_markdown(build_report(jobs), "cmd")
    assert "val bits/byte" in md and "1.20× (no test)" in md
    assert "val bits/byte" not in to_markdown(build_report([_job("0", ["p=a"], 10.0)]), "cmd")


# ---------------------------------------------------------------- plots

def test_pareto_ties_are_not_dominated():
    # float noise, one seed each: both on the frontier (before: the 2nd was "beaten")
    assert sorted(pareto_front([(100.0, 449.536664), (100.0, 449.536679)], True)) == [0, 1]
    assert sorted(pareto_front([(100.0, 449.5), (100.3, 449.6)], True)) == [0, 1]   # within 0.5%
    assert pareto_front([(100.0, 449.5), (100.0, 460.0)], True) == [0]
    # seeds: a gap within the seed spread is a tie, a gap beyond it is not
    noisy = [([100.0, 101.0, 99.0], [10.1, 10.4, 9.8]), ([100.0, 101.0, 99.0], [10.3, 9.9, 10.2])]
    assert sorted(pareto_front(noisy, True)) == [0, 1]
    clear = [([100.0, 101.0, 99.0], [10.1, 10.4, 9.8]), ([100.0, 101.0, 99.0], [10.6, 10.9, 11.3])]
    assert pareto_front(clear, True) == [0]
    pts = [(100, 10.0), (200, 12.0), (150, 13.0), (50, 9.0)]
    assert sorted(pareto_front(pts, x_higher_better=True)) == [0, 1, 3]
    assert sorted(pareto_front(pts, x_higher_better=False)) == [3]


def test_ratio_axes_include_baseline_and_do_not_zoom():
    lo, hi = ratio_limits([0.97, 1.0], [0.0, 0.0])
    assert lo <= 0.9 and hi >= 1.1                  # a 3% gap stays a small gap
    lo, hi = ratio_limits([1.5, 1.7], [0.05, 0.0])
    assert lo <= 1.0 and hi >= 1.7                  # the baseline stays in view
    assert ratio_limits([0.3], [5.0])[0] == 0.0     # a huge 2-seed CI does not push the axis below 0


def _crowded_report(seeds=1):
    jobs = []
    for i, mem in enumerate((1023.0, 822.0, 968.0, 841.0, 1001.0, 822.0)):
        for s in range(seeds):
            job = _job(str(len(jobs)), [f"memory=m{i}", f"accum=a{i % 2}", f"seed={s}"],
                       449.536664 + 1e-5 * i + 0.5 * s, 3000.0 + 10 * i + 7 * s, mem + s)
            job.curve = [(k, 8.0 - 0.05 * k) for k in range(1, 21)]
            job.val_curve = [(10, 7.5), (20, 7.0)] if i != 3 else [(10, 7.6), (20, 7.2)]
            jobs.append(job)
    return build_report(jobs)


def test_point_labels_do_not_overlap(tmp_path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xy = [(1.0, 1.0), (1.004, 1.0), (1.008, 1.0), (1.012, 1.001), (1.3, 0.9), (1.0, 1.0)]
    ax.plot(*zip(*xy), "o")
    ax.set_xlim(0.8, 1.4)
    ax.set_ylim(0.8, 1.2)
    labels = place_labels(ax, xy, {i: str(i + 1) for i in range(len(xy))})
    renderer = fig.canvas.get_renderer()
    boxes = [lab.get_window_extent(renderer) for lab in labels]
    assert sorted(t for lab in labels for t in lab.get_text().split(", ")) == ["1", "2", "3", "4", "5", "6"]
    assert any(", " in lab.get_text() for lab in labels)          # the coincident points share one label
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    plt.close(fig)


def test_plots_written_with_seeds_and_single_seed(tmp_path):
    for seeds in (1, 3):
        out = tmp_path / str(seeds)
        out.mkdir()
        written = write_plots(_crowded_report(seeds), out)
        assert [p.name for p in written] == ["ppl_vs_throughput.png", "ppl_vs_memory.png", "loss_curves.png"]
        assert all(p.stat().st_size > 10_000 for p in written)
    # a baseline without a result: absolute axes instead of ratios
    jobs = [JobRecord("0", ["p=fp32"], summary=None), _job("1", ["p=bf16"], 10.0), _job("2", ["p=fp16"], 11.0)]
    assert len(write_plots(build_report(jobs, baseline="p=fp32"), tmp_path)) == 2   # no curves logged


def test_loss_curves_identical_ones_named_and_val_panel(tmp_path):
    import matplotlib.pyplot as plt

    report = _crowded_report()
    curve = mean_curve([[(1, 2.0), (2, 1.0)], [(1, 4.0), (2, 3.0)]])
    assert curve == ([1, 2], [3.0, 2.0], [2.0, 1.0], [4.0, 3.0])
    assert same_curve(curve, mean_curve([[(1, 3.0000001), (2, 2.0)]])) and not same_curve(curve, ([1], [3.0]))
    saved = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        saved["fig"] = fig
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        assert plot_loss_curves(report, tmp_path / "loss.png")
    finally:
        plt.Figure.savefig = real_savefig
    train_ax, val_ax = saved["fig"].axes[:2]
    assert "training" in train_ax.get_title() and "validation" in val_ax.get_title()
    notes = [t.get_text() for t in train_ax.texts]
    assert notes and "1 = 2 = 3 = 4 = 5 = 6" in notes[0]                 # all training curves coincide
    val_notes = " ".join(t.get_text() for t in val_ax.texts)
    assert val_notes.endswith(": 1 = 2 = 3 = 5 = 6")                     # 4 differs on validation
    styles = {(line.get_linestyle(), line.get_marker()) for line in train_ax.get_lines()}
    assert len(styles) == 6                                                # each line looks different


def test_trade_off_axes_are_ratios(tmp_path):
    import matplotlib.pyplot as plt

    captured = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        captured["ax"] = fig.axes[0]
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        assert plot_trade_off(_crowded_report(3), tmp_path / "m.png", "peak_mem_mb", "peak memory, MB", False)
    finally:
        plt.Figure.savefig = real_savefig
    ax = captured["ax"]
    lo, hi = ax.get_ylim()
    assert lo <= 0.9 and hi >= 1.1 and "÷ baseline" in ax.get_ylabel()
    xlo, xhi = ax.get_xlim()
    assert xlo <= 0.8036 and xhi >= 1.0


# ---------------------------------------------------------------- differing settings

def _cfg(steps=20, source="pydocs", n_layer=2, batch=16, accum=1, seq=32):
    return {"model": {"n_layer": n_layer, "d_model": 128}, "seed": 1,
            "data": {"source": source, "seq_len": seq, "cache_dir": "/x"},
            "trainer": {"max_steps": steps, "batch_size": batch, "accum_steps": accum, "log_every": 10}}


def _cjob(name, overrides, cfg):
    job = _job(name, overrides, 10.0)
    job.config = cfg
    return job


def test_differing_data_steps_model_are_warned():
    jobs = [_cjob("0", ["p=fp32", "seed=1"], _cfg()), _cjob("1", ["p=bf16", "seed=1"], _cfg()),
            _cjob("2", ["p=bf16", "seed=2"], _cfg(steps=10, source="shakespeare"))]
    report = build_report(jobs)
    keys = {d.key: d for d in report.differences}
    assert set(keys) == {"data.source", "trainer.max_steps"}
    assert not keys["trainer.max_steps"].set_by_override
    md = to_markdown(report, "cmd")
    assert "settings differ between jobs" in md
    assert "`trainer.max_steps`: 20 in `p=fp32`, `p=bf16` (jobs 0, 1); 10 in `p=bf16` (job 2)" in md


def test_swept_model_is_named_and_matched_batches_pass():
    swept = [_cjob("0", ["model=tiny"], _cfg()), _cjob("1", ["model=small"], _cfg(n_layer=4))]
    diffs = setting_differences(swept, label_of, [])
    assert [(d.key, d.set_by_override) for d in diffs] == [("model.n_layer", True)]
    # the memory preset: 16 x 1 vs 4 x 4 sequences per step is the same budget; seeds, log_every ignored
    memory = [_cjob("0", ["+experiment/accum=bs16_accum1"], _cfg()),
              _cjob("1", ["+experiment/accum=bs4_accum4"], {**_cfg(batch=4, accum=4), "seed": 2})]
    assert setting_differences(memory, label_of, []) == []
    assert compared_settings(_cfg(batch=4, accum=4))["tokens/step"] == 512
    halved = [_cjob("0", ["a=1"], _cfg()), _cjob("1", ["a=2"], _cfg(batch=8))]
    assert [d.key for d in setting_differences(halved, label_of, [])] == ["tokens/step"]
    assert setting_differences([_job("0", ["a=1"], 1.0), _job("1", ["a=2"], 1.0)], label_of, []) == []
