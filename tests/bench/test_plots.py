
import itertools

import pytest

from attnzoo.bench import plots

from .plot_data import CROWD, results

plt = pytest.importorskip("matplotlib.pyplot")
plots._pyplot()  # the Agg backend


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def panels(fig):
    return [ax for ax in fig.axes if ax.axison]


def texts(ax):
    return [t.get_text() for t in ax.texts]


def test_spread_labels_keeps_order_gap_and_bounds():
    wishes = [5.0, 1.0, 1.1, 1.2, 9.0, 1.15]
    got = plots.spread_labels(wishes, gap=0.5, lo=0.0, hi=10.0)
    order = sorted(range(len(wishes)), key=lambda i: wishes[i])
    placed = [got[i] for i in order]
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(placed))  # apart, order kept
    assert got[0] == 5.0 and got[4] == 9.0  # labels with room stay where they were wanted
    assert abs(sum(got[i] for i in (1, 2, 3, 5)) / 4 - sum(wishes[i] for i in (1, 2, 3, 5)) / 4) < 1e-9  # centred
    assert plots.spread_labels([0.0, 0.0], gap=1.0, lo=0.0) == [0.0, 1.0]  # pushed up off the floor
    assert plots.spread_labels([10.0, 10.0], gap=1.0, hi=10.0) == [9.0, 10.0]  # and down from the ceiling


def test_time_small_multiples_one_panel_per_family_with_sdpa_in_each():
    fig = plots.efficiency_figure(results(), "fwd", "time_median_s", "time (ms)", 1e3, plt)
    axes = panels(fig)
    assert [ax.get_title(loc="left").split(" (")[0] for ax in axes] == [
        "softmax", "structured", "sparse", "linear", "other"]  # catalogue order, unknown names last
    assert "self/noncausal" in fig._suptitle.get_text()  # the pattern with the most methods, named
    for ax in axes:
        dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert len(dashed) == 1 and dashed[0].get_color() == "black"  # SDPA, once per panel
        assert list(dashed[0].get_xdata()) == [256, 512, 1024]
        assert "SDPA" in texts(ax)
        assert len(ax.texts) == len(ax.lines)  # every line named, no legend
        assert ax.get_legend() is None
    assert set(texts(axes[-1])) == {*CROWD, "SDPA"}
    assert {ax.get_ylim() for ax in axes} == {axes[0].get_ylim()}  # one scale for every panel


def test_line_names_do_not_overlap():
    fig = plots.efficiency_figure(results(), "fwd", "time_median_s", "time (ms)", 1e3, plt)
    crowded = panels(fig)[-1]  # twelve nearly equal lines
    heights = sorted(crowded.transData.transform((1, t.xyann[1]))[1] for t in crowded.texts)  # in pixels
    assert len(heights) == len(CROWD) + 1
    line_px = plots.LABEL_PT * fig.dpi / 72
    assert all(high - low >= line_px - 1e-6 for low, high in itertools.pairwise(heights))


def test_memory_small_multiples_and_one_length_degrades():
    assert plots.efficiency_figure(results(), "fwd", "peak_bytes", "MiB", 1 / 2**20, plt) is not None
    one = results(lengths=(2048,))
    assert plots.efficiency_figure(one, "fwd", "time_median_s", "time (ms)", 1e3, plt) is None  # no curve to draw
    assert plots.ratio_figure(one, "fwd", plt) is not None  # the bars still show each method


def test_ratio_bars_grouped_by_family_with_reference():
    fig = plots.ratio_figure(results(), "fwd", plt)
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == [f"{p}, N = 1024" for p in (
        "self/noncausal", "self/causal", "cross/noncausal", "cross/causal")]
    labels = [t.get_text() for t in axes[0].get_yticklabels()]
    headings = [x for x in labels if " (" in x]
    assert [h.split(" (")[0] for h in headings] == ["softmax", "structured", "sparse", "linear", "other"]
    assert "softmax" not in labels  # the baseline is the reference line, not a bar
    assert labels.index("lightning") > labels.index("linear (2)")  # under its family's heading
    for ax in axes:
        assert any(list(line.get_xdata()) == [1.0, 1.0] for line in ax.lines)  # the 1x line
    assert axes[1].get_xlim() == axes[0].get_xlim()  # comparable across patterns
    # sorted within a family, fastest first: linear (N^1 from 4 ms) before sliding_window? both N^1; linear family:
    # linear (4.0 ms at 256) before lightning (4.2 ms)
    assert labels.index("linear") < labels.index("lightning")


def test_quality_and_approximation_bars():
    fig = plots.approximation_figure(results(), plt)
    assert len(panels(fig)) == 4
    fig = plots.quality_figure(results(), plt)
    assert [ax.get_title() for ax in panels(fig)] == ["mqar (pairs=4, vocab=16), width 32",
                                                      "mqar (pairs=8, vocab=16), width 32"]
    for ax in panels(fig):
        assert sorted(line.get_linestyle() for line in ax.lines) == ["--", ":"]  # softmax dashed, chance dotted
    assert plots.quality_figure(results(quality=False), plt) is None


def test_mqar_small_multiples_with_softmax_in_each():
    fig = plots.mqar_figure(results(), plt)
    for ax in panels(fig):
        assert "softmax" in texts(ax)


def test_write_plots_names_sizes_and_degrade(tmp_path):
    made = plots.write_plots(results(crowd=False, modes=("fwd+bwd",)), tmp_path)
    assert made == ["time_fwdbwd.png", "memory_fwdbwd.png", "ratio_fwdbwd.png", "quality.png", "mqar.png",
                    "approximation.png"]
    assert all(0 < (tmp_path / name).stat().st_size < 100_000 for name in made)  # palette PNGs
    failed = {"efficiency": [r for r in results()["efficiency"] if r["status"] != "ok"]}
    assert plots.write_plots(failed, tmp_path / "none") == []
    assert plots.write_plots({}, tmp_path / "none") == []


def test_without_matplotlib_no_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    assert plots.write_plots(results(), tmp_path) == []
