"""Plot a Grafana dashboard's panels from a real Prometheus into a PNG.

Each panel's PromQL (the exact ``expr`` strings of the dashboard JSON, with Grafana's
template variables substituted the way Grafana does) goes to Prometheus' HTTP API:
stat and bar-gauge panels as an instant query at the end of the range, time series
as a range query. The PNG keeps the dashboard's grid, titles and units, so the README
can show what the dashboard shows without a Grafana server.

    python tools/render_dashboard.py charts/lethe/dashboards/cost.json \\
        --prometheus http://127.0.0.1:9091 --last 3600 --var namespace=default --out cost.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRID_COLUMNS = 24
# Grafana's dark theme, so the picture reads like the dashboard it stands for.
BG, PANEL, BORDER, TEXT, MUTED, GRID = (
    "#111217",
    "#181b1f",
    "#2c3235",
    "#ccccdc",
    "#8e8e98",
    "#2c3235",
)
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9"]
NAMED = {
    "green": "#73bf69",
    "red": "#f2495c",
    "orange": "#ff9830",
    "yellow": "#fade2a",
    "blue": "#5794f2",
    "purple": "#b877d9",
}


# -- queries -------------------------------------------------------------------------
@dataclass
class Window:
    """The dashboard's time range and Grafana's interval variables for it."""

    start: float
    end: float
    step: float
    scrape_interval: float

    @property
    def range_s(self) -> int:
        return max(1, math.ceil(self.end - self.start))

    @property
    def rate_interval_s(self) -> int:
        # Grafana: max($__interval + scrape interval, 4 x scrape interval)
        return math.ceil(max(self.step + self.scrape_interval, 4 * self.scrape_interval))


def substitute(expr: str, variables: dict[str, str], window: Window) -> str:
    """Grafana's variable interpolation for a Prometheus target (regex-safe values)."""
    builtins = {
        "__range": f"{window.range_s}s",
        "__range_s": str(window.range_s),
        "__rate_interval": f"{window.rate_interval_s}s",
        "__interval": f"{math.ceil(window.step)}s",
        "__interval_ms": str(int(window.step * 1000)),
    }
    values = {**builtins, **variables}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def api(base: str, path: str, params: dict[str, str]) -> Any:
    url = f"{base.rstrip('/')}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def instant(base: str, expr: str, at: float) -> list[dict[str, Any]]:
    return api(base, "query", {"query": expr, "time": f"{at:.3f}"})["result"]


def series(base: str, expr: str, w: Window) -> list[dict[str, Any]]:
    return api(
        base,
        "query_range",
        {"query": expr, "start": f"{w.start:.3f}", "end": f"{w.end:.3f}", "step": f"{w.step:g}"},
    )["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


# -- units (as Grafana shows them) ---------------------------------------------------
def _auto(v: float, sig: int = 3) -> str:
    """Enough decimals for ``sig`` significant digits, never scientific notation."""
    if v == 0:
        return "0"
    decimals = max(0, sig - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def _fixed(v: float, decimals: int | None) -> str:
    return _auto(v) if decimals is None else f"{v:.{decimals}f}"


def _duration(v: float, decimals: int | None) -> str:
    if v == 0:
        return "0 s"
    for limit, div, name in (
        (1, 0.001, "ms"),
        (60, 1, "s"),
        (3600, 60, "min"),
        (86400, 3600, "hour"),
        (float("inf"), 86400, "day"),
    ):
        if abs(v) < limit:
            return f"{_fixed(v / div, decimals)} {name}"
    raise AssertionError("unreachable")


def _short(v: float, decimals: int | None) -> str:
    for div, suffix in ((1e12, " T"), (1e9, " B"), (1e6, " Mil"), (1e3, " K")):
        if abs(v) >= div:
            return f"{_fixed(v / div, decimals)}{suffix}"
    return _fixed(v, decimals)


def fmt_value(v: float, unit: str, decimals: int | None = None) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if unit == "currencyUSD":
        # cents and below stay visible: one erasure's retrain can cost well under a cent
        return "$" + (_short(v, 2) if abs(v) >= 1000 else _auto(v, 3 if abs(v) < 1 else 4))
    if unit == "s":
        return _duration(v, decimals)
    if unit == "h":  # as Grafana: under an hour in minutes or seconds
        if v == 0:
            return "0 h"
        return _duration(v * 3600, decimals) if abs(v) < 1 else f"{_fixed(v, decimals)} hour"
    if unit == "percentunit":
        return f"{_fixed(v * 100, 1 if decimals is None else decimals)}%"
    if unit.startswith("suffix:"):
        return f"{_fixed(v, decimals)}{unit.removeprefix('suffix:')}"
    return _short(v, decimals)


def override_color(name: str, overrides: list[dict[str, Any]]) -> str | None:
    """The fixed colour a byRegexp/byName override gives a series (the last match wins)."""
    color = None
    for o in overrides:
        m = o.get("matcher", {})
        hit = (m.get("id") == "byRegexp" and re.fullmatch(m.get("options", ""), name)) or (
            m.get("id") == "byName" and m.get("options") == name
        )
        for prop in o.get("properties", []) if hit else []:
            if prop.get("id") == "color" and prop["value"].get("fixedColor"):
                color = NAMED.get(prop["value"]["fixedColor"], prop["value"]["fixedColor"])
    return color


def threshold_color(v: float, steps: list[dict[str, Any]]) -> str:
    color = steps[0]["color"] if steps else "green"
    for s in steps:
        if s.get("value") is not None and not math.isnan(v) and v >= s["value"]:
            color = s["color"]
    return NAMED.get(color, color)


# -- drawing -------------------------------------------------------------------------
def render(
    dashboard: dict[str, Any],
    base: str,
    window: Window,
    variables: dict[str, str],
    out: Path,
    shown_vars: dict[str, str] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter
    from matplotlib.patches import FancyBboxPatch
    from matplotlib.ticker import FuncFormatter

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width, unit_h, header = 16.0, 0.3, 0.75
    height = rows * unit_h + header
    fig = plt.figure(figsize=(width, height), dpi=110, facecolor=BG)
    fig.text(
        0.008,
        1 - 0.28 / height,
        dashboard["title"],
        color=TEXT,
        fontsize=15,
        weight="bold",
        va="center",
    )
    shown = shown_vars or variables
    span = (
        f"{dt.datetime.fromtimestamp(window.start, dt.UTC):%Y-%m-%d %H:%M:%S} to "
        f"{dt.datetime.fromtimestamp(window.end, dt.UTC):%H:%M:%S} UTC"
    )
    fig.text(
        0.008,
        1 - 0.58 / height,
        "   ".join(f"{k}: {v}" for k, v in shown.items())
        + f"   |   {span}   |   each panel plotted from its own PromQL, queried from Prometheus"
        " (tools/render_dashboard.py), not a Grafana screenshot",
        color=MUTED,
        fontsize=8.5,
        va="center",
    )
    pad_x, pad_y = 0.004, 0.06 / height

    def box(p: dict[str, Any]) -> tuple[float, float, float, float]:
        g = p["gridPos"]
        x0 = g["x"] / GRID_COLUMNS + pad_x
        w = g["w"] / GRID_COLUMNS - 2 * pad_x
        y1 = 1 - (header + g["y"] * unit_h) / height - pad_y
        h = g["h"] * unit_h / height - 2 * pad_y
        return x0, y1 - h, w, h

    for p in panels:
        x, y, w, h = box(p)
        fig.patches.append(
            FancyBboxPatch(
                (x, y),
                w,
                h,
                boxstyle="round,pad=0,rounding_size=0.003",
                transform=fig.transFigure,
                facecolor=PANEL,
                edgecolor=BORDER,
                linewidth=0.8,
                zorder=-1,  # under the panel's axes
            )
        )
        title_h = 0.3 / height
        fig.text(
            x + 0.006,
            y + h - title_h / 2 - 0.02 / height,
            p["title"],
            color=TEXT,
            fontsize=9.5,
            weight="bold",
            va="center",
        )
        d = p["fieldConfig"]["defaults"]
        unit, decimals = d.get("unit", "short"), d.get("decimals")
        steps = d.get("thresholds", {}).get("steps", [])
        exprs = [
            (substitute(t["expr"], variables, window), t.get("legendFormat", ""))
            for t in p["targets"]
        ]
        inner = (x + 0.01, y + 0.06 / height, w - 0.02, h - title_h - 0.12 / height)
        # room for the tick labels of a time series: y on the left, time below
        plot = (x + 0.7 / width, y + 0.3 / height, w - 0.8 / width, h - title_h - 0.38 / height)
        if p["type"] == "stat":
            values = [
                (legend(lf, r["metric"]), float(r["value"][1]))
                for e, lf in exprs
                for r in instant(base, e, window.end)
            ]
            if not values:
                fig.text(x + w / 2, y + h * 0.42, "No data", color=MUTED, fontsize=16, ha="center")
            for i, (_, v) in enumerate(values):
                cx = x + w * (i + 0.5) / len(values)
                fig.text(
                    cx,
                    y + h * 0.4,
                    fmt_value(v, unit, decimals),
                    color=threshold_color(v, steps),
                    fontsize=26 if len(values) == 1 else 16,
                    weight="bold",
                    ha="center",
                    va="center",
                )
        elif p["type"] == "bargauge":
            bars = [
                (legend(lf, r["metric"]), float(r["value"][1]))
                for e, lf in exprs
                for r in instant(base, e, window.end)
            ]
            ax = fig.add_axes(inner, facecolor=PANEL)
            ax.set_axis_off()
            if not bars:
                ax.text(0.5, 0.5, "No data", color=MUTED, fontsize=14, ha="center", va="center")
            top = max([abs(v) for _, v in bars if math.isfinite(v)] + [1e-12])
            n = max(1, len(bars))
            for i, (name, v) in enumerate(bars):
                yc = 1 - (i + 0.5) / n
                bh = min(0.5 / n, 0.16)
                frac = abs(v) / top if math.isfinite(v) else 0
                ax.text(0.0, yc + bh * 0.9, name, color=TEXT, fontsize=8.5, va="bottom")
                ax.add_patch(
                    plt.Rectangle((0, yc - bh / 2), 0.78, bh, color=BORDER, transform=ax.transAxes)
                )
                ax.add_patch(
                    plt.Rectangle(
                        (0, yc - bh / 2),
                        0.78 * frac,
                        bh,
                        color=threshold_color(v, steps),
                        transform=ax.transAxes,
                    )
                )
                ax.text(
                    0.8,
                    yc,
                    fmt_value(v, unit, decimals),
                    color=threshold_color(v, steps),
                    fontsize=10,
                    weight="bold",
                    va="center",
                )
        else:  # timeseries
            ax = fig.add_axes(plot, facecolor=PANEL)
            step_style = d.get("custom", {}).get("lineInterpolation") == "stepAfter"
            k = 0
            for e, lf in exprs:
                for r in series(base, e, window):
                    ts = [dt.datetime.fromtimestamp(float(t), dt.UTC) for t, _ in r["values"]]
                    vs = [float(v) for _, v in r["values"]]
                    name = legend(lf, r["metric"])
                    overrides = p["fieldConfig"].get("overrides", [])
                    ax.plot(
                        ts,
                        vs,
                        color=override_color(name, overrides) or PALETTE[k % len(PALETTE)],
                        linewidth=1.8,
                        label=name,
                        drawstyle="steps-post" if step_style else "default",
                    )
                    k += 1
            if k == 0:
                ax.text(0.5, 0.5, "No data", color=MUTED, fontsize=14, ha="center", va="center")
            ax.set_xlim(
                dt.datetime.fromtimestamp(window.start, dt.UTC),
                dt.datetime.fromtimestamp(window.end, dt.UTC),
            )
            ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, u=unit: fmt_value(v, u)))
            if d.get("min") is not None:
                ax.set_ylim(bottom=d["min"])
            ax.tick_params(colors=MUTED, labelsize=7.5)
            ax.grid(color=GRID, linewidth=0.6)
            for s in ax.spines.values():
                s.set_visible(False)
            if k:
                ax.legend(
                    loc="upper left",
                    fontsize=7.5,
                    frameon=False,
                    labelcolor=TEXT,
                    ncols=min(k, 4),
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=BG)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dashboard", type=Path)
    p.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--start", type=float, help="unix time (default: end - --last)")
    p.add_argument("--end", type=float, help="unix time (default: now)")
    p.add_argument("--last", type=float, default=3600, help="seconds, when --start is not given")
    p.add_argument("--step", type=float, help="range-query step (default: range / 300)")
    p.add_argument("--scrape-interval", type=float, default=15, help="for $__rate_interval")
    p.add_argument("--var", action="append", default=[], help="NAME=VALUE (default: All)")
    args = p.parse_args(argv)
    end = args.end or time.time()
    start = args.start or end - args.last
    step = args.step or max(1.0, round((end - start) / 300))
    dashboard = json.loads(args.dashboard.read_text())
    given = dict(v.split("=", 1) for v in args.var)
    variables, shown = {}, {}
    for v in dashboard.get("templating", {}).get("list", []):
        if v["type"] == "datasource":
            continue
        value = given.get(v["name"], v.get("allValue") or ".*")
        variables[v["name"]] = value
        shown[v.get("label") or v["name"]] = "All" if v["name"] not in given else value
    render(
        dashboard,
        args.prometheus,
        Window(start, end, step, args.scrape_interval),
        variables,
        args.out,
        shown,
    )
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
