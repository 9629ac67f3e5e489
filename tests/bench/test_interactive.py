import base64
import gzip
import json
import re
import sys

import pytest

from attnzoo.bench import interactive

from .plot_data import PATTERNS, results

FAMILIES = ["softmax", "structured", "sparse", "linear", "other"]


@pytest.fixture
def fig():
    made = interactive.figures(results())
    assert [f.id for f in made] == ["az-fig-fwd", "az-fig-fwdbwd", "az-fig-ratios"]
    return made[0]


def panel_axes(spec):
    return sorted(k.replace("axis", "") for k in spec["layout"] if re.fullmatch(r"xaxis\d*", k))


def test_figure_is_plain_json(fig):
    back = json.loads(json.dumps(fig.spec, allow_nan=False))
    assert back == fig.spec and set(back) == {"data", "layout"}


def test_one_panel_per_family_sdpa_in_each_for_every_pattern(fig):
    layout, data = fig.spec["layout"], fig.spec["data"]
    assert [a["text"] for a in layout["annotations"]] == [f"<b>{f}</b>" for f in FAMILIES]
    axes = panel_axes(fig.spec)
    assert len(axes) == len(FAMILIES)
    for k, axis in enumerate(axes):
        assert layout[f"xaxis{axis[1:]}"]["type"] == "log" and layout[f"yaxis{axis[1:]}"]["type"] == "log"
        if k:
            assert layout[f"xaxis{axis[1:]}"]["matches"] == "x" and layout[f"yaxis{axis[1:]}"]["matches"] == "y"
    for pattern in PATTERNS:
        sdpa = [t for t in data if t["name"] == "SDPA" and t["meta"]["pattern"] == pattern]
        assert sorted(t["xaxis"] for t in sdpa) == axes
        assert all(t["line"]["dash"] == "dash" and t["line"]["color"] == "black" for t in sdpa)
        assert sum(t["showlegend"] for t in sdpa) == 1  # one legend entry toggles SDPA everywhere
    groups = {t["legendgroup"] for t in data if t["name"] != "SDPA"}
    assert groups == set(FAMILIES)  # the legend toggles methods, grouped (and toggled) by family


def test_hover_carries_method_backend_length_time_ratio_memory(fig):
    trace = next(t for t in fig.spec["data"] if t["name"] == "linear" and t["visible"])
    template = trace["hovertemplate"]
    for part in ("<b>linear</b>", "backend torch", "linear · self/noncausal · fwd", "N = %{x}", "ms", "× SDPA",
                 "MiB"):
        assert part in template
    assert trace["customdata"][-1] == ["16", "0.16", "1.00", "16", "1.00"]  # time, IQR, ratio, MiB, ratio at 1024


def test_pattern_buttons_show_one_pattern_and_measure_buttons_switch_y(fig):
    data = fig.spec["data"]
    patterns, measures = fig.spec["layout"]["updatemenus"]
    assert [b["label"] for b in patterns["buttons"]] == list(PATTERNS)
    assert {t["meta"]["pattern"] for t in data if t["visible"]} == {"self/noncausal"}  # the headline first
    for button in patterns["buttons"]:
        shown = button["args"][0]["visible"]
        assert len(shown) == len(data)
        assert {t["meta"]["pattern"] for t, v in zip(data, shown, strict=True) if v} == {button["label"]}
    time, memory = measures["buttons"]
    assert time["args"][0]["y"] == [t["y"] for t in data]
    assert memory["args"][1]["yaxis.title.text"] == "peak memory (MiB)"
    assert len(memory["args"][0]["y"]) == len(data)


def test_ratio_map_one_trace_per_family_and_a_menu_of_modes_and_patterns():
    (ratios,) = [f for f in interactive.figures(results()) if f.id == "az-fig-ratios"]
    data, (menu,) = ratios.spec["data"], ratios.spec["layout"]["updatemenus"]
    assert [b["label"] for b in menu["buttons"]] == [f"{m} · {p} · N = 1024" for m in ("fwd", "fwd+bwd")
                                                     for p in PATTERNS]
    shown = [t for t in data if t["visible"]]
    assert [t["name"] for t in shown] == ["softmax", "structured", "sparse", "linear", "other"]  # toggled by family
    assert {(t["meta"]["mode"], t["meta"]["pattern"]) for t in shown} == {("fwd", "self/noncausal")}
    linear = next(t for t in shown if t["name"] == "linear")
    assert linear["x"] == [1.0, 1.05] and linear["customdata"][0][:3] == ["linear", "torch", 1024]
    assert "SDPA" not in {c[0] for t in data for c in t["customdata"]}  # SDPA is the (1, 1) cross, not a point


def test_one_length_gives_only_the_ratio_map_and_no_data_no_figure():
    assert [f.id for f in interactive.figures(results(lengths=(2048,)))] == ["az-fig-ratios"]
    assert interactive.figures({"efficiency": []}) == []
    assert interactive.figures_html({"efficiency": []}) is None


def test_fragment_embeds_inlined_plotly_and_each_figure():
    plotly = pytest.importorskip("plotly")
    from importlib import resources

    html = interactive.figures_html(results())
    assert html.count('<figure class="az-figure"') == 3 and html.count('<div class="az-plot"></div>') == 3
    packed = re.search(r'"data:application/gzip;base64,([A-Za-z0-9+/=]+)"', html).group(1)
    js = resources.files(plotly).joinpath("package_data", "plotly.min.js").read_bytes()
    assert gzip.decompress(base64.b64decode(packed)) == js
    specs = re.search(r'<script type="application/json" id="az-figure-specs">(.*?)</script>', html, re.S).group(1)
    assert set(json.loads(specs)) == {"az-fig-fwd", "az-fig-fwdbwd", "az-fig-ratios"}
    assert '"responsive": true' in html and '"displaylogo": false' in html


def test_none_without_plotly(monkeypatch):
    interactive.plotly_script.cache_clear()
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly raises ImportError
    try:
        assert interactive.plotly_script() is None
        assert interactive.figures_html(results()) is None
        assert interactive.figures(results())  # the figures themselves need no package
    finally:
        interactive.plotly_script.cache_clear()
