"""The Analytics tab's Bokeh charts: what they draw, in what order, and that text stays text."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from bokeh.models import GlyphRenderer, HoverTool, Legend, Whisker
from bokeh.plotting import figure

from panel_app import charts
from panel_app.charts import Bar
from panel_app.views.analytics import ChartTabs

XSS = "<img src=x onerror=alert(1)>"


def compare_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "target": ["openai / gpt-4o", f"{XSS} / m"],
            "count": [10, 5],
            "failures": [1, 0],
            "prompt_tokens_sum": [100, 50],
            "completion_tokens_sum": [30, 20],
        }
    )


def glyphs(plot: figure, kind: str) -> list[GlyphRenderer]:
    return [r for r in plot.renderers if type(r.glyph).__name__ == kind]


def tooltips(plot: figure) -> list[tuple[str, str]]:
    (hover,) = [tool for tool in plot.tools if isinstance(tool, HoverTool)]
    return list(hover.tooltips)


def test_bars_list_targets_top_down_with_raw_text_and_escaped_tooltips() -> None:
    plot = charts.hbar_chart(
        compare_frame(),
        "target",
        [Bar("count")],
        title="Calls",
        xlabel="calls",
        height=200,
        tooltips=[("failures", "@failures{0,0}")],
    )
    # Bokeh's categorical axis runs bottom-up: the first row is the last factor.
    assert list(plot.y_range.factors) == [f"{XSS} / m", "openai / gpt-4o"]
    (bars,) = glyphs(plot, "HBar")
    data = bars.data_source.data
    assert list(data["target"]) == ["openai / gpt-4o", f"{XSS} / m"]  # not pre-escaped
    assert list(data["count"]) == [10, 5]
    assert list(data["failures"]) == [1, 0]  # tooltip columns come along
    assert all("{safe}" not in spec for _, spec in tooltips(plot))  # Bokeh escapes values
    assert plot.title.text == "Calls"
    assert plot.x_range.start == 0


def test_stacked_bars_put_out_after_in_with_a_legend() -> None:
    plot = charts.hbar_chart(
        compare_frame(),
        "target",
        [Bar("prompt_tokens_sum", "in"), Bar("completion_tokens_sum", "out", "#ff7f0e")],
        title="Tokens",
        xlabel="tokens",
        height=200,
        stacked=True,
    )
    first, second = glyphs(plot, "HBar")
    source = first.data_source
    assert list(source.data["prompt_tokens_sum"]) == [100, 50]
    # the second segment starts where the first ends
    assert list(second.glyph.left.expr.fields) == ["prompt_tokens_sum"]
    assert list(second.glyph.right.expr.fields) == ["prompt_tokens_sum", "completion_tokens_sum"]
    (legend,) = [item for item in plot.right if isinstance(item, Legend)]
    assert [item.label.value for item in legend.items] == ["in", "out"]


def test_lines_one_per_series_and_markers_only_for_short_ones() -> None:
    hours = pd.date_range("2026-01-01", periods=6, freq="h")
    frame = pd.DataFrame(
        {
            "bucket": [*hours, *hours, hours[0]],
            "provider": ["b"] * 6 + ["a"] * 6 + [XSS],
            "count": [*range(6), *range(10, 16), 3],
            "failures": [0] * 13,
        }
    )
    plot = charts.line_chart(
        frame,
        "bucket",
        "count",
        "provider",
        title="Calls over time",
        xlabel="time",
        ylabel="calls",
        height=200,
        tooltips=[("failures", "@failures")],
    )
    lines = glyphs(plot, "Line")
    assert [r.data_source.data["provider"][0] for r in lines] == [XSS, "a", "b"]  # by name
    assert list(lines[1].data_source.data["count"]) == list(range(10, 16))
    (marker,) = glyphs(plot, "Scatter")  # the one-point series only
    assert list(marker.data_source.data["provider"]) == [XSS]
    assert "failures" in lines[1].data_source.data
    assert all("{safe}" not in spec for _, spec in tooltips(plot))
    assert plot.legend[0].click_policy == "hide"


def test_box_stats_match_numpy_and_leave_outliers_out_of_the_whiskers() -> None:
    values = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 100], dtype=float)
    stats = charts.box_stats(values)
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    assert (stats["q1"], stats["q2"], stats["q3"]) == (q1, q2, q3)
    assert (stats["lower"], stats["upper"]) == (1.0, 9.0)
    assert stats["n"] == 10


@pytest.mark.parametrize("kind", ["box", "violin"])
def test_distribution_draws_each_target_in_name_order(kind: str) -> None:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "target": ["b"] * 200 + [XSS] * 50 + ["a"] * 1 + ["none"] * 2,
            "latency_ms": [*rng.lognormal(5, 1, 200), *rng.lognormal(6, 0.5, 50), 42.0, None, None],
        }
    )
    plot = charts.distribution_chart(
        frame, "target", "latency_ms", kind=kind, title="Latency", ylabel="ms", height=300
    )
    # a target without a latency has no box
    assert list(plot.x_range.factors) == [XSS, "a", "b"]
    upper_halves = glyphs(plot, "VBar")[0].data_source.data
    b = frame.loc[frame.target == "b", "latency_ms"].to_numpy()
    assert upper_halves["q2"][2] == pytest.approx(np.median(b))
    assert upper_halves["n"] == [50.0, 1.0, 200.0]
    if kind == "box":
        assert any(isinstance(item, Whisker) for item in plot.center)
        (outliers,) = glyphs(plot, "Scatter")
        upper = upper_halves["upper"][2]
        drawn = [y for x, y in zip(*outliers.data_source.data.values(), strict=True) if x == "b"]
        assert sorted(drawn) == sorted(v for v in b if v > upper or v < upper_halves["lower"][2])
    else:
        patches = glyphs(plot, "Patch")
        assert len(patches) == 3
        outline = patches[2].data_source.data  # "b": covers its values, half a slot wide
        assert min(outline["y"]) < b.min() and max(outline["y"]) > b.max()
        assert max(offset for _, offset in outline["x"]) == pytest.approx(0.4)


def test_chart_tabs_build_only_the_chart_in_view() -> None:
    built: list[str] = []

    def builder(name: str):
        def build() -> figure:
            built.append(name)
            return figure(title=name)

        return build

    tabs = ChartTabs(["One", "Two"], "sqllm-test")
    tabs.show({"One": builder("one v1"), "Two": builder("two v1")})
    assert built == ["one v1"]
    assert tabs.panes["One"].object.title.text == "one v1"
    tabs.tabs.active = 1  # opening the other tab builds its chart from the data it was given
    assert built == ["one v1", "two v1"]
    tabs.tabs.active = 0  # nothing new: no rebuild
    assert built == ["one v1", "two v1"]
    tabs.show({"One": builder("one v2"), "Two": builder("two v2")}, height=333)
    assert built[-1] == "one v2"
    assert tabs.panes["Two"].height == 333
    tabs.tabs.active = 1
    assert built[-1] == "two v2"
