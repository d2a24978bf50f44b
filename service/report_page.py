"""A dictionary's report as one self-contained HTML page: inline SVG plots, no external asset,
and a playground that unfolds a pasted activation through the API and shows its certificate."""

from __future__ import annotations

import json
import math
from html import escape
from importlib import resources
from typing import Any

import numpy as np

from .registry import Entry

ASSETS = resources.files("service") / "assets"
STYLE = (ASSETS / "report.css").read_text()
SCRIPT = (ASSETS / "report.js").read_text()
"""The page's style sheet and playground script, inlined into every page."""
WIDTH, HEIGHT = 460, 240
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 28, 42
COLORS = {"omp": "#1f77b4", "omp_positive": "#17becf", "lasso": "#d62728",
          "lasso_positive": "#ff9896"}  # fmt: skip
NAMES = {"omp": "OMP", "omp_positive": "OMP, codes ≥ 0", "lasso": "l1 (LASSO)",
         "lasso_positive": "l1, codes ≥ 0"}  # fmt: skip


def _frame(title: str, xlabel: str, ylabel: str, body: str, ticks: str, plot_id: str) -> str:
    return (
        f'<svg class="plot" id="{plot_id}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" aria-label="{escape(title)}">'
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" class="title">{escape(title)}</text>'
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{HEIGHT - TOP - BOTTOM}" class="frame"/>{body}{ticks}'
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle">'
        f"{escape(xlabel)}</text>"
        f'<text transform="translate(12 {(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" '
        f'text-anchor="middle">{escape(ylabel)}</text></svg>'
    )


class _Axes:
    """Maps data to the plot area; `log` x uses log2."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float, log: bool = False):
        self.log = log
        self.x0, self.x1 = (math.log2(x0), math.log2(x1)) if log else (x0, x1)
        self.y0, self.y1 = y0, y1
        if self.x1 <= self.x0:
            self.x1 = self.x0 + 1
        if self.y1 <= self.y0:
            self.y1 = self.y0 + 1

    def x(self, value: float) -> float:
        value = math.log2(value) if self.log else value
        return LEFT + (value - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return HEIGHT - BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)

    def ticks(self, xs: list[float], ys: list[float], xfmt="{:g}", yfmt="{:g}") -> str:
        parts = []
        for value in xs:
            x = self.x(value)
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM + 4}"'
                f' class="tick"/><text x="{x:.1f}" y="{HEIGHT - BOTTOM + 15}" '
                f'text-anchor="middle" class="small">{xfmt.format(value)}</text>'
            )
        for value in ys:
            y = self.y(value)
            parts.append(
                f'<line x1="{LEFT - 4}" x2="{LEFT}" y1="{y:.1f}" y2="{y:.1f}" class="tick"/>'
                f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="small">'
                f"{yfmt.format(value)}</text>"
            )
        return "".join(parts)

    def vline(self, value: float, label: str, color: str, row: int = 0) -> str:
        x = self.x(value)
        return (
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="{color}" '
            f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{TOP + 12 + 12 * row}" '
            f'class="small" fill="{color}">{escape(label)}</text>'
        )


def histogram_plot(
    histogram: dict, title: str, xlabel: str, plot_id: str, marks: list[tuple] = ()
) -> str:
    counts, edges = histogram["counts"], histogram["edges"]
    axes = _Axes(edges[0], edges[-1], 0, max(max(counts, default=0), 1))
    bars = []
    for count, left, right in zip(counts, edges, edges[1:], strict=False):
        x, y = axes.x(left), axes.y(count)
        width = max(axes.x(right) - x - 1, 0.5)
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" '
            f'height="{HEIGHT - BOTTOM - y:.1f}" class="bar"><title>{left:.3g}–{right:.3g}: '
            f"{count}</title></rect>"
        )
    for row, (value, label, color) in enumerate(marks):
        bars.append(axes.vline(value, label, color, row))
    xs = list(np.linspace(edges[0], edges[-1], 5))
    ys = [0, max(counts, default=0)]
    return _frame(title, xlabel, "count", "".join(bars), axes.ticks(xs, ys, "{:.3g}"), plot_id)


def recovery_plot(recovery: dict, plot_id: str) -> str:
    curves = [c for c in recovery["curves"] if c["ks"]]
    largest = max((max(c["ks"]) for c in curves), default=2)
    theory = recovery["l1_transition"]
    for value in (theory.get("signed"), theory.get("nonnegative")):
        if value:
            largest = max(largest, value)
    axes = _Axes(1, max(largest, 2), 0, 1, log=True)
    parts = []
    for curve in curves:
        name = _name(curve)
        color = COLORS[name]
        points = " ".join(
            f"{axes.x(k):.1f},{axes.y(share):.1f}"
            for k, share in zip(curve["ks"], curve["recovered"], strict=True)
        )
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2" '
            f'class="curve" data-method="{name}"/>'
        )
        for k, share in zip(curve["ks"], curve["recovered"], strict=True):
            parts.append(
                f'<circle cx="{axes.x(k):.1f}" cy="{axes.y(share):.1f}" r="2.5" fill="{color}">'
                f"<title>{NAMES[name]}: k={k}, {share:.0%}</title></circle>"
            )
        if curve["recommended_k"]:
            k = curve["recommended_k"]
            parts.append(
                f'<path d="M{axes.x(k):.1f},{axes.y(0.95) - 9:.1f} l-4,-7 h8 z" fill="{color}" '
                f'class="recommended"><title>{NAMES[name]}: recommended k = {k}</title></path>'
            )
    for row, (key, label) in enumerate((("signed", "l1 theory"), ("nonnegative", "l1 ≥0 theory"))):
        if theory.get(key):
            parts.append(axes.vline(theory[key], label, "#777", row))
    legend = "".join(
        f'<rect x="{LEFT + 8}" y="{HEIGHT - BOTTOM - 14 - 13 * i}" width="10" height="3" '
        f'fill="{COLORS[_name(c)]}"/><text x="{LEFT + 22}" y="{HEIGHT - BOTTOM - 10 - 13 * i}" '
        f'class="small">{NAMES[_name(c)]}</text>'
        for i, c in enumerate(curves)
    )
    xs = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if k <= largest]
    ticks = axes.ticks(xs, [0, 0.5, 0.95, 1], yfmt="{:.0%}")
    return _frame(
        "Exact recovery of synthetic k-sparse codes (▼ recommended k)",
        "k (non-zeros per code)",
        "recovered",
        "".join(parts) + legend,
        ticks,
        plot_id,
    )


ENCODER_SERIES = (("unfold_f1", "Unfold (OMP, codes ≥ 0)", COLORS["omp"]),
                  ("encoder_f1", "SAE encoder", "#9467bd"))  # fmt: skip


def encoder_plot(comparison: dict, plot_id: str) -> str:
    """Support F1 per k of the SAE's encoder and of Unfold (non-negative OMP)."""
    ks = comparison["ks"]
    axes = _Axes(1, max(max(ks, default=2), 2), 0, 1, log=True)
    parts = []
    for i, (key, label, color) in enumerate(ENCODER_SERIES):
        points = " ".join(
            f"{axes.x(k):.1f},{axes.y(v):.1f}" for k, v in zip(ks, comparison[key], strict=True)
        )
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2" '
            f'class="encoder-curve" data-series="{key}"/>'
            f'<rect x="{LEFT + 8}" y="{HEIGHT - BOTTOM - 14 - 13 * i}" width="10" height="3" '
            f'fill="{color}"/><text x="{LEFT + 22}" y="{HEIGHT - BOTTOM - 10 - 13 * i}" '
            f'class="small">{label}</text>'
        )
    xs = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= max(ks, default=1)]
    return _frame(
        "Support F1 on synthetic codes: SAE encoder against Unfold",
        "k (non-zeros per code)",
        "support F1",
        "".join(parts),
        axes.ticks(xs, [0, 0.5, 1]),
        plot_id,
    )


def _encoder_section(comparison: dict | None) -> str:
    if comparison is None:
        return ""
    rows = "".join(
        f"<tr><td class='num'>{k}</td><td class='num'>{uf:.3f}</td><td class='num'>{ef:.3f}</td>"
        f"<td class='num'>{ue:.3g}</td><td class='num'>{ee:.3g}</td><td class='num'>{l0:.1f}</td>"
        "</tr>"
        for k, uf, ef, ue, ee, l0 in zip(
            comparison["ks"], comparison["unfold_f1"], comparison["encoder_f1"],
            comparison["unfold_relative_error"], comparison["encoder_relative_error"],
            comparison["encoder_l0"], strict=True,
        )
    )  # fmt: skip
    return f"""
<section id="encoder"><h2>The SAE's own encoder ({escape(comparison["architecture"])})</h2>
<div class="plots">{encoder_plot(comparison, "encoder-plot")}
<table><tr><th>k</th><th>Unfold F1</th><th>encoder F1</th><th>Unfold error</th>
<th>encoder error</th><th>encoder L0</th></tr>{rows}</table></div>
<p class="note">{escape(comparison["note"])}.</p></section>"""


def _name(curve: dict) -> str:
    return f"{curve['method']}_positive" if curve["positive"] else curve["method"]


def example_activation(entry: Entry) -> tuple[list[float], list[int]]:
    """An activation made of three features (fixed seed): the playground's example."""
    directions = np.asarray(entry.record.directions)
    rng = np.random.default_rng(0)
    features = sorted(rng.choice(len(directions), min(3, len(directions)), replace=False))
    codes = np.array([2.0, 1.0, 0.5][: len(features)])
    x = codes @ directions[features]
    if entry.record.bias is not None:
        x = x + np.asarray(entry.record.bias)
    return [round(float(v), 6) for v in x], [int(f) for f in features]


def render(entry: Entry, state: str, report: dict[str, Any] | None, *, refresh_s: int) -> str:
    record = entry.record
    name = escape(record.name)
    example, features = example_activation(entry)
    sections = []
    if report is None:
        sections.append(
            f'<p class="pending" id="pending">The report is {escape(state)}: this page reloads '
            f"every {refresh_s} s until it is ready. The playground works meanwhile.</p>"
        )
    else:
        sections.append(_report_sections(report, record.labels))
    config = {"dictionary": record.id, "example": example, "example_features": features,
              "labels": record.labels is not None,
              "encoder": record.encoder is not None}  # fmt: skip
    refresh = f'<meta http-equiv="refresh" content="{refresh_s}">' if report is None else ""
    return PAGE.format(
        title=f"Unfold report: {name}",
        refresh=refresh,
        style=STYLE,
        name=name,
        shape=f"{record.n_features} features × {record.d_model} dimensions",
        id=escape(record.id),
        sections="".join(sections),
        config=json.dumps(config).replace("<", "\\u003c"),  # raw text: no "</script>"
        script=SCRIPT,
    )


def _report_sections(report: dict, labels) -> str:
    norms, coherence, recovery = report["norms"], report["coherence"], report["recovery"]
    recommended = "".join(
        f"<tr><td>{NAMES[key]}</td><td class='num'>{value}</td></tr>"
        for key, value in recovery["recommended_k"].items()
    )
    theory = recovery["l1_transition"]
    theory_rows = "".join(
        f"<tr><td>{label}</td><td class='num'>{theory[key]:.1f}</td></tr>"
        for key, label in (("signed", "l1 transition, Gaussian (theory)"),
                           ("nonnegative", "l1 ≥0 transition, Gaussian (theory)"))
        if theory.get(key)
    )  # fmt: skip
    pairs = "".join(
        f"<tr><td class='num'>{p['i']}</td><td class='num'>{p['j']}</td>"
        f"<td class='num'>{p['cosine']:+.4f}</td>"
        f"<td>{escape(' / '.join(p['labels'])) if p.get('labels') else ''}</td></tr>"
        for p in coherence["top_pairs"]
    )
    note = f'<p class="note">{escape(recovery["note"])}</p>' if recovery.get("note") else ""
    truncated = "".join(
        f'<p class="note">{NAMES[_name(c)]}: stopped early ({escape(c["truncated"])}).</p>'
        for c in recovery["curves"]
        if c["truncated"]
    )
    marks = [
        (coherence["welch_bound"], f"Welch bound {coherence['welch_bound']:.3f}", "#2ca02c"),
        (coherence["mutual"], f"mutual {coherence['mutual']:.3f}", "#d62728"),
    ]
    return f"""
<section class="cards">
  <div class="card"><h3>Mutual coherence</h3><p class="big">{coherence["mutual"]:.3f}</p>
    <p>Welch bound {coherence["welch_bound"]:.3f}; every code of at most
    <b>{coherence["guaranteed_k"]}</b> features is provably recovered (Tropp 2004).</p></div>
  <div class="card"><h3>Recommended k (≥ 95% exact)</h3>
    <table>{recommended}{theory_rows}</table></div>
  <div class="card"><h3>Norms</h3><p>min {norms["min"]:.4g}, median {norms["median"]:.4g},
    max {norms["max"]:.4g}</p><p class="note">computed in {report["seconds"]:.1f} s,
    {escape(report["computed_at"])}; {recovery["trials"]} codes per k</p></div>
</section>
{note}{truncated}
<section class="plots">
  {recovery_plot(recovery, "recovery-plot")}
  {
        histogram_plot(
            coherence["histogram"], "|cosine| between features", "|cosine|", "coherence-plot", marks
        )
    }
  {histogram_plot(norms["histogram"], "Feature norms", "norm", "norms-plot")}
</section>
<p class="note">Recovered: {escape(recovery["criterion"])}.</p>
{_encoder_section(report.get("encoder"))}
<section><h2>Most similar features</h2>
<table class="pairs"><tr><th>i</th><th>j</th><th>cosine</th><th>labels</th></tr>{pairs}</table>
</section>"""  # noqa: E501


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<title>{title}</title><style>{style}</style></head>
<body>
<h1>{name}</h1>
<p class="sub">{shape} · id <code>{id}</code></p>
{sections}
<section id="playground"><h2>Playground</h2>
<p>Paste an activation vector (numbers separated by commas or spaces), or
<button type="button" id="example">use an example</button>.</p>
<textarea id="activation" aria-label="activation"></textarea>
<p><label>method <select id="method"><option value="omp">OMP</option>
<option value="lasso">LASSO</option></select></label>
<label>k <input id="k" type="number" value="8" min="1" style="width:5em"></label>
<label>alpha <input id="alpha" type="number" value="0.01" step="any" style="width:6em"></label>
<label><input id="positive" type="checkbox"> codes ≥ 0</label>
<label>API key <input id="key" type="password" style="width:10em"></label>
<button type="button" id="run">Unfold</button></p>
<div id="result-summary"></div>
<svg id="result-plot" width="640" height="0" role="img" aria-label="unfolded features"></svg>
</section>
<script type="application/json" id="config">{config}</script>
<script>{script}</script>
</body></html>
"""
