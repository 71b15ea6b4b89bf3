"""Bokeh figures for the Analytics tab: horizontal bars, lines over time, box and violin plots.

Built with Bokeh directly rather than through HoloViews/hvplot: a chart costs the server
about a third as much (tens of milliseconds instead of over a hundred), which matters
on a tab that draws several charts per refresh. Text from the record (provider, model
and target names) goes in unescaped: Bokeh draws axis, legend and title text on the
canvas and escapes tooltip values (no tooltip here uses ``{safe}``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from bokeh.models import (
    ColumnDataSource,
    FactorRange,
    HoverTool,
    Legend,
    NumeralTickFormatter,
    Whisker,
)
from bokeh.palettes import Category10_10, Category20_20
from bokeh.plotting import figure
from scipy.stats import gaussian_kde

TOOLS = "pan,wheel_zoom,box_zoom,reset,save"
Tooltip = tuple[str, str]  # (label, Bokeh field spec such as "@count{0,0}")


@dataclass(frozen=True)
class Bar:
    """One column of a frame drawn as bars: its label in the legend, colour and thickness."""

    column: str
    label: str = ""
    color: str = "#1f77b4"
    thickness: float = 0.8


def palette(n: int) -> list[str]:
    """`n` distinct colours (repeating past 20)."""
    colors = Category10_10 if n <= 10 else Category20_20
    return [colors[i % len(colors)] for i in range(n)]


def _figure(title: str, height: int, **kwargs) -> figure:
    plot = figure(
        title=title,
        height=height,
        sizing_mode="stretch_width",
        tools=TOOLS,
        toolbar_location="right",
        **kwargs,
    )
    plot.toolbar.logo = None
    return plot


def _legend_right(plot: figure) -> None:
    """Move the figure's legend (if any) outside the plot area, on the right."""
    if plot.legend:
        legend: Legend = plot.legend[0]
        legend.click_policy = "hide"
        plot.add_layout(legend, "right")


def hbar_chart(
    frame: pd.DataFrame,
    category: str,
    bars: Sequence[Bar],
    *,
    title: str,
    xlabel: str,
    height: int,
    tooltips: Sequence[Tooltip] = (),
    stacked: bool = False,
) -> figure:
    """Horizontal bars, one row per value of `category` (first row at the top).

    Several `bars` are drawn over each other (thinner ones in front), or end to end when
    `stacked`; either way with a legend when they have labels.
    """
    factors = [str(v) for v in frame[category]]
    data = {category: factors, **{bar.column: frame[bar.column].to_numpy() for bar in bars}}
    for column in {c for _, spec in tooltips for c in _fields(spec)} - set(data):
        data[column] = frame[column].to_numpy()
    source = ColumnDataSource(data)
    plot = _figure(title, height, y_range=FactorRange(*reversed(factors)))
    if stacked:
        renderers = plot.hbar_stack(
            [bar.column for bar in bars],
            y=category,
            height=max(bar.thickness for bar in bars),
            color=[bar.color for bar in bars],
            legend_label=[bar.label for bar in bars],
            source=source,
        )
    else:
        renderers = [
            plot.hbar(
                y=category,
                right=bar.column,
                height=bar.thickness,
                color=bar.color,
                source=source,
                **({"legend_label": bar.label} if bar.label else {}),
            )
            for bar in bars
        ]
    plot.add_tools(
        HoverTool(renderers=list(renderers), tooltips=[(category, f"@{{{category}}}"), *tooltips])
    )
    plot.x_range.start = 0
    plot.xaxis.axis_label = xlabel
    plot.xaxis.formatter = NumeralTickFormatter(format="0,0.[00]")
    plot.ygrid.grid_line_color = None
    _legend_right(plot)
    return plot


def line_chart(
    frame: pd.DataFrame,
    x: str,
    y: str,
    by: str,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    height: int,
    tooltips: Sequence[Tooltip] = (),
) -> figure:
    """One line per value of `by` over datetime `x` (naive UTC); a series of one or two
    points is drawn as markers too, so it does not vanish."""
    plot = _figure(title, height, x_axis_type="datetime")
    groups = list(frame.groupby(by, sort=True)) if len(frame) else []
    renderers = []
    extra = [c for _, spec in tooltips for c in _fields(spec) if c not in (x, y, by)]
    for (name, part), color in zip(groups, palette(len(groups)), strict=True):
        part = part.sort_values(x)
        data = {x: part[x].to_numpy(), y: part[y].to_numpy(dtype=float, na_value=np.nan)}
        data[by] = [str(name)] * len(part)
        for column in extra:
            data[column] = part[column].to_numpy()
        source = ColumnDataSource(data)
        label = str(name)
        renderers.append(
            plot.line(x, y, source=source, color=color, line_width=2, legend_label=label)
        )
        if len(part) <= 2:
            renderers.append(
                plot.scatter(x, y, source=source, color=color, size=7, legend_label=label)
            )
    plot.add_tools(
        HoverTool(
            renderers=renderers,
            tooltips=[
                (by, f"@{{{by}}}"),
                (xlabel, f"@{{{x}}}{{%F %H:%M}}"),
                (ylabel, f"@{{{y}}}{{0,0.[000]}}"),
                *tooltips,
            ],
            formatters={f"@{{{x}}}": "datetime"},
        )
    )
    plot.xaxis.axis_label = xlabel
    plot.yaxis.axis_label = ylabel
    plot.yaxis.formatter = NumeralTickFormatter(format="0,0.[00]")
    _legend_right(plot)
    return plot


def box_stats(values: np.ndarray) -> dict[str, float]:
    """Quartiles, Tukey whiskers (the furthest values within 1.5 IQR of the box) of `values`."""
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    iqr = q3 - q1
    inside = values[(values >= q1 - 1.5 * iqr) & (values <= q3 + 1.5 * iqr)]
    return {
        "q1": float(q1),
        "q2": float(q2),
        "q3": float(q3),
        "lower": float(inside.min()),
        "upper": float(inside.max()),
        "n": float(len(values)),
    }


def distribution_chart(
    frame: pd.DataFrame,
    category: str,
    value: str,
    *,
    kind: str,
    title: str,
    ylabel: str,
    height: int,
) -> figure:
    """One box (quartiles, whiskers, outliers) or violin (a kernel density estimate with
    the quartiles inside) per value of `category`."""
    groups = [
        (str(name), part[value].dropna().to_numpy(dtype=float))
        for name, part in frame.groupby(category, sort=True)
    ]
    groups = [(name, values) for name, values in groups if len(values)]
    factors = [name for name, _ in groups]
    plot = _figure(title, height, x_range=FactorRange(*factors))
    colors = palette(len(groups))
    stats = [box_stats(values) for _, values in groups]
    boxes = ColumnDataSource(
        {
            category: factors,
            "color": colors,
            **{key: [s[key] for s in stats] for key in ("q1", "q2", "q3", "lower", "upper", "n")},
        }
    )
    if kind == "violin":
        for (name, values), color in zip(groups, colors, strict=True):
            xs, ys = _violin_outline(name, values)
            plot.patch(xs, ys, fill_color=color, fill_alpha=0.5, line_color=color)
        width = 0.06
    else:
        width = 0.6
        outliers = [
            (name, v)
            for (name, values), s in zip(groups, stats, strict=True)
            for v in values[(values < s["lower"]) | (values > s["upper"])]
        ]
        plot.add_layout(
            Whisker(base=category, upper="upper", lower="lower", source=boxes, level="underlay")
        )
        if outliers:
            plot.scatter(
                [o[0] for o in outliers],
                [o[1] for o in outliers],
                size=4,
                color="#666666",
                alpha=0.6,
            )
    box = plot.vbar(
        category, width, "q2", "q3", source=boxes, fill_color="color", line_color="black"
    )
    plot.vbar(category, width, "q1", "q2", source=boxes, fill_color="color", line_color="black")
    plot.add_tools(
        HoverTool(
            renderers=[box],
            tooltips=[
                (category, f"@{{{category}}}"),
                ("calls", "@n{0,0}"),
                ("median", "@q2{0,0.[0]}"),
                ("quartiles", "@q1{0,0.[0]} – @q3{0,0.[0]}"),
                ("whiskers", "@lower{0,0.[0]} – @upper{0,0.[0]}"),
            ],
        )
    )
    plot.y_range.start = 0
    plot.yaxis.axis_label = ylabel
    plot.yaxis.formatter = NumeralTickFormatter(format="0,0")
    plot.xaxis.major_label_orientation = math.radians(20)
    plot.xgrid.grid_line_color = None
    return plot


def _violin_outline(name: str, values: np.ndarray, points: int = 80) -> tuple[list, list]:
    """The outline of a violin at factor `name`: SciPy's Gaussian kernel density estimate
    (Scott's bandwidth), scaled to half a category's width, mirrored. Values without any
    spread (one call, or all equal) get a flat outline."""
    low, high = float(values.min()), float(values.max())
    if high > low:
        kde = gaussian_kde(values)
        pad = float(np.sqrt(kde.covariance[0, 0]))  # one bandwidth beyond the data
        grid = np.linspace(low - pad, high + pad, points)
        density = kde(grid)
        density = density / density.max() * 0.4
    else:
        grid, density = np.array([low]), np.array([0.4])
    xs = [(name, float(-d)) for d in density] + [(name, float(d)) for d in density[::-1]]
    ys = list(grid) + list(grid[::-1])
    return xs, ys


def _fields(spec: str) -> list[str]:
    """Column names a tooltip spec reads ("@count{0,0}", "@{a b}")."""
    fields = []
    rest = spec
    while "@" in rest:
        rest = rest[rest.index("@") + 1 :]
        if rest.startswith("{"):
            name, _, rest = rest[1:].partition("}")
        else:
            end = next(
                (i for i, ch in enumerate(rest) if not (ch.isalnum() or ch == "_")), len(rest)
            )
            name, rest = rest[:end], rest[end:]
        fields.append(name)
    return fields
