"""`report.html`: one self-contained page (inline CSS and SVG, no network) drawn from exactly
the data in `report.json` and `profiles/*.json`.

Every bar and point carries its number in `data-value`, taken from the same dictionary that
`report.json` is written from, so a script (or a test) can check the page against the JSON.
A small inline script records, once the browser has laid the page out, how many marks each
chart rendered (`<body data-rendered=...>`).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from toolchain.reporting.words import (
    facts_line,
    metric_line,
    near_ties_line,
    output_label,
    parity_verdict,
    subset_line,
)

W, ROW, PAD = 560, 22, 150  # chart width, bar row height, label column
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def write_html(folder: Path, report: dict[str, Any]) -> None:
    """`report.html` for the report dictionary (as written to report.json) and the folder's
    profiles and sensitivity files."""
    entries = [("fp32_reference", report["reference"])] + [(a["name"], a) for a in report["artifacts"]]
    profiles = {n: json.loads((folder / e["profile"]).read_text()) for n, e in entries if e.get("profile")}
    sensitivity = {
        a["name"]: json.loads((folder / a["recovery"]["sensitivity"]).read_text())
        for a in report["artifacts"]
        if (a.get("recovery") or {}).get("sensitivity")
    }
    (folder / "report.html").write_text(render(report, profiles, sensitivity))


def render(
    report: dict[str, Any], profiles: dict[str, dict[str, Any]], sensitivity: dict[str, dict] | None = None
) -> str:
    names = ["fp32_reference"] + [a["name"] for a in report["artifacts"]]
    ref = report["reference"]
    rows = [("fp32_reference", ref)] + [(a["name"], a) for a in report["artifacts"]]
    verdict = report["verdict"]
    tone = {True: "passed", False: "failed", None: "built"}[report["passed"]]  # the heading's colour
    parts = [
        f"<h1>{html_text(report['model']['name'])} → {html_text(report['target'])}: "
        f"<span class='{tone}'>{verdict}</span></h1>",
        _model_line(report),
        _alerts(report),
        _parity_table(report),
        "<h2>Latency and size, FP32 vs each artifact</h2><div class='row'>",
        _bars("latency", "latency p50, batch 1 (ms)", [(n, r["latency_ms"]) for n, r in rows], "{:.3f} ms"),
        _bars(
            "size", "size on disk (MB)", [(n, r["size_bytes"]) for n, r in rows], "{:.2f} MB", scale=1 / 2**20
        ),
        "</div>",
        _latency_table(rows),
        "<h2>Throughput vs batch size</h2>",
        _throughput([(n, r["bench"]["sweep"]) for n, r in rows]),
        *[_sensitivity(n, data) for n, data in (sensitivity or {}).items()],
        "<h2>Where the time goes: top operators by self time (batch 1)</h2><div class='row'>",
        *[_operators(n, profiles[n]) for n in names if n in profiles],
        "</div>",
        _notes(report),
    ]
    data = json.dumps(report).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">\
<title>{html_text(report["model"]["name"])} → {html_text(report["target"])}</title>
<style>{CSS}</style></head>
<body>
{"".join(parts)}
<script type="application/json" id="report-json">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def html_text(v: Any) -> str:
    return html.escape(str(v))


def _model_line(report: dict) -> str:
    """Source, weights, input, primary artifact, build time; the weights text has parentheses of its own."""
    m = report["model"]
    weights = f"; weights: {html_text(m['weights'])}" if m.get("weights") else ""
    return (
        f"<p>Model <code>{html_text(m['source'])}</code>{weights}; "
        f"input {'x'.join(map(str, m['input_shape']))}; primary artifact: "
        f"<b>{html_text(report['primary'] or 'none')}</b>; built in {report['build_seconds']} s.</p>"
    )


def _parity_table(report: dict) -> str:
    head = (
        "<tr><th>artifact</th><th>format</th><th>precision</th><th>SQNR dB</th><th>cosine</th>"
        "<th>top-1 agreement</th><th>accuracy</th><th>parity</th></tr>"
    )
    ref = report["reference"]
    acc = "" if ref["accuracy"] is None else f"{ref['accuracy']:.2%}"
    body = [
        f"<tr><td>fp32_reference</td><td>{html_text(ref['format'])}</td><td>fp32</td><td></td><td></td><td></td><td>{acc}</td><td></td></tr>"
    ]
    for a in report["artifacts"]:
        p = a["parity"]
        verdict = parity_verdict(p["passed"], p["failures"])
        # "nan" / "inf" as written
        cell = lambda v, f: "" if v is None else (v if isinstance(v, str) else f.format(v))
        body.append(
            f"<tr class='{'primary' if a['primary'] else ''}'>"
            f"<td>{html_text(a['name'])}{' ★' if a['primary'] else ''}</td><td>{html_text(a['format'])}</td>"
            f"<td>{html_text(a['precision'])}</td><td data-key='sqnr_db'>{cell(p['sqnr_db'], '{:.1f}')}</td>"
            f"<td>{cell(p['cosine'], '{:.4f}')}</td>"
            f"<td>{cell(p['top1_agreement'], '{:.2%}')}</td><td>{cell(p['accuracy'], '{:.2%}')}</td>"
            f"<td>{html_text(verdict)}</td></tr>"
        )
        if len(p.get("outputs", [])) > 1:
            body += [
                f"<tr class='output'><td>&nbsp;&nbsp;output {html_text(output_label(_Output(o)))}</td>"
                "<td></td><td></td>"
                f"<td>{cell(o['sqnr_db'], '{:.1f}')}</td><td>{cell(o['cosine'], '{:.4f}')}</td>"
                f"<td>{cell(o['top1_agreement'], '{:.2%}')}</td><td>{cell(o['accuracy'], '{:.2%}')}</td>"
                f"<td>{html_text(parity_verdict(o['passed'], o['failures']))}</td></tr>"
                for o in p["outputs"]
            ]
    return f"<h2>Parity against FP32</h2><table>{head}{''.join(body)}</table>"


class _Output:
    """report.json's output entry with the attribute names `output_label` reads."""

    def __init__(self, o: dict) -> None:
        self.index, self.name, self.role, self.role_inferred = (
            o["index"],
            o["name"],
            o["role"],
            o["role_inferred"],
        )


def _alerts(report: dict) -> str:
    """Beside the verdict: recovery's line per artifact, the warnings, and whether host parity is a proxy."""
    items = []
    if report.get("metric"):
        scores = [
            (a["name"], a["parity"]["metric"]) for a in report["artifacts"] if a["parity"].get("metric")
        ]
        items.append(f"<li class='metric'>{html_text(metric_line(report['metric'], scores))}</li>")
    items += [
        f"<li class='recovery'>{html_text(a['recovery']['summary'])}</li>"
        for a in report["artifacts"]
        if a.get("recovery")
    ]

    def ties(a: dict, o: dict) -> str:
        output = output_label(_Output(o)) if len(a["parity"]["outputs"]) > 1 else None
        return html_text(near_ties_line(a["name"], output, o["top1_agreement"], o["near_ties"]))

    items += [
        f"<li class='ties'>{ties(a, o)}</li>"
        for a in report["artifacts"]
        for o in a["parity"]["outputs"]
        if o.get("near_ties")
    ]
    items += [f"<li class='warning'>⚠ {html_text(w)}</li>" for w in report["warnings"]]
    cpu = report.get("cpu") or {}
    if cpu.get("proxy") and not cpu.get("target_isa"):  # an x86 mismatch is among the warnings already
        items.append(f"<li class='proxy'>host parity is a proxy: {html_text(cpu['proxy_reason'])}</li>")
    return f"<ul class='alerts'>{''.join(items)}</ul>" if items else ""


def _latency_table(rows) -> str:
    head = (
        "<tr><th></th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>best batch</th>"
        "<th title='resident memory the model adds while loading and running "
        "(its runtime library already loaded)'>peak memory MB</th><th>threads</th></tr>"
    )
    body = []
    for name, r in rows:
        b = r["bench"]
        one = b["sweep"][0]
        mem = _memory(b["peak_memory_bytes"])
        body.append(
            f"<tr><td>{html_text(name)}</td><td>{one['p50_ms']:.3f}</td><td>{one['p95_ms']:.3f}</td><td>{one['p99_ms']:.3f}</td>"
            f"<td>{b['best_batch'] if b['best_batch'] is not None else 'none fits'}</td>"
            f"<td>{mem}</td><td>{b['threads']}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _num(v) -> str:
    return "n/a" if v is None else (v if isinstance(v, str) else f"{v:.6g}")


def _memory(n: int | None) -> str:
    """Resident memory the model added (its runtime's library loaded beforehand); n/a where the
    system cannot say, "< 0.1" rather than 0.0 for a tiny model."""
    if n is None:
        return "<span title='this system does not report a resident-memory high-water mark'>n/a</span>"
    return (
        f"{n / 2**20:.1f}"
        if n >= 2**20 / 10
        else "<span title='resident memory added while loading and running: under 0.1 MB'>&lt; 0.1</span>"
    )


def _short(name: str, limit: int) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _bars(
    chart: str,
    title: str,
    values: list[tuple[str, float]],
    fmt: str,
    scale: float = 1.0,
    label_w: int = PAD,
    limit: int | None = None,
    base: float = 0.0,
    labels: list[str] | None = None,
) -> str:
    """One bar per (full name, value), its length from ``base``; labels longer than ``limit``
    (default: what fits in ``label_w``) end in an ellipsis, the full name is in the label's and
    the bar's tooltip and in its data-label. Each bar is followed by its value with its unit
    (``fmt``), or by ``labels[i]`` where given."""
    limit = limit or (label_w - 8) // 7  # 12 px text: about 7 px a character
    texts = labels or [fmt.format(v * scale) for _, v in values]
    top = max(((v - base) * scale for _, v in values), default=0) or 1.0
    span = W - label_w - 12 - 7 * max(map(len, texts), default=0)  # room for the longest value after its bar
    marks = []
    for i, (name, value) in enumerate(values):
        y = 24 + i * ROW
        w = max(1.0, (value - base) * scale / top * span)
        shown = html_text(texts[i])
        marks.append(
            f"<text x='{label_w - 6}' y='{y + 14}' text-anchor='end'>"
            f"<title>{html_text(name)}</title>{html_text(_short(name, limit))}</text>"
            f"<rect class='bar' data-chart='{chart}' data-label='{html_text(name)}' data-value='{value}' "
            f"x='{label_w}' y='{y + 2}' width='{w:.1f}' height='{ROW - 6}' fill='{COLORS[i % len(COLORS)]}'>"
            f"<title>{html_text(name)}: {shown}</title></rect>"
            f"<text x='{label_w + w + 4:.1f}' y='{y + 14}'>{shown}</text>"
        )
    height = 30 + len(values) * ROW
    return (
        f"<figure><svg class='chart' data-chart='{chart}' width='{W}' height='{height}' "
        f"viewBox='0 0 {W} {height}'>"
        f"<text x='0' y='14' class='title'>{html_text(title)}</text>{''.join(marks)}</svg></figure>"
    )


def _throughput(series: list[tuple[str, list[dict]]]) -> str:
    """Samples per second: bars when the target runs one batch size, lines over batch sizes otherwise."""
    batches = sorted({p["batch_size"] for _, pts in series for p in pts})
    if len(batches) == 1:
        bars = _bars(
            "throughput",
            f"samples / s at batch {batches[0]}",
            [(n, pts[0]["throughput"]) for n, pts in series],
            "{:,.1f} samples/s",
        )
        return bars.replace(
            "class='bar' data-chart='throughput'",
            f"class='bar' data-chart='throughput' data-batch='{batches[0]}'",
        )
    return _lines("throughput", "samples / s by batch size", series)


DASHES = ["", "6 3", "2 3", "8 3 2 3", "1 2", "10 4"]
# with DASHES: series told apart without colour
MARKERS = ["circle", "square", "triangle", "diamond", "down", "plus"]
_CORNERS = {  # marker outlines in units of the marker's radius
    "square": [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)],
    "triangle": [(0, -1.2), (1.1, 0.9), (-1.1, 0.9)],
    "diamond": [(0, -1.3), (1.3, 0), (0, 1.3), (-1.3, 0)],
    "down": [(0, 1.2), (1.1, -0.9), (-1.1, -0.9)],
    "plus": [
        (-0.4, -1.1),
        (0.4, -1.1),
        (0.4, -0.4),
        (1.1, -0.4),
        (1.1, 0.4),
        (0.4, 0.4),
        (0.4, 1.1),
        (-0.4, 1.1),
        (-0.4, 0.4),
        (-1.1, 0.4),
        (-1.1, -0.4),
        (-0.4, -0.4),
    ],
}


def marker_path(shape: str, x: float, y: float, r: float) -> str:
    """SVG path data of a marker about 2r across, centred on (x, y)."""
    if shape == "circle":
        return f"M{x - r:.1f},{y:.1f}a{r},{r} 0 1 0 {2 * r},0a{r},{r} 0 1 0 {-2 * r},0z"
    return "M" + "L".join(f"{x + dx * r:.1f},{y + dy * r:.1f}" for dx, dy in _CORNERS[shape]) + "z"


def y_axis(values: list[float]) -> tuple[Any, list[float], bool]:
    """(position 0..1 of a value, tick values, log scale?). Logarithmic where the values span more
    than 20x, so that a slow runtime's line does not lie flat along the axis under a fast one's."""
    shown = [v for v in values if v > 0 and math.isfinite(v)] or [1.0]
    lo, hi = min(shown), max(shown)
    if hi / lo > 20:
        first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        return (
            lambda v: (math.log10(v) - first) / (last - first) if v > 0 else 0.0,
            [10.0**k for k in range(first, last + 1)],
            True,
        )
    step = 10 ** math.floor(math.log10(hi / 4))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if hi / 4 <= step * m)
    ticks = [i * step for i in range(math.ceil(hi / step - 1e-9) + 1)]
    return lambda v: v / ticks[-1], ticks, False


def _axes(
    x_of: dict[int, float], y_of: dict[float, float], box: tuple[float, float, float, float], y_title: str
) -> list[str]:
    """Grid lines and tick labels at ``y_of``'s values, batch sizes along x, both axes titled."""
    left, top, right, bottom = box
    tick = lambda t: f"{t:,.0f}" if t >= 10 else f"{t:g}"
    marks = [
        f"<line x1='{left}' y1='{y:.1f}' x2='{right}' y2='{y:.1f}' stroke='#eee'/>"
        f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end'>{tick(t)}</text>"
        for t, y in y_of.items()
    ]
    marks += [f"<text x='{x:.1f}' y='{bottom + 18}' text-anchor='middle'>{b}</text>" for b, x in x_of.items()]
    middle = (top + bottom) / 2
    return marks + [
        f"<line x1='{left}' y1='{bottom}' x2='{right}' y2='{bottom}' stroke='#999'/>"
        f"<line x1='{left}' y1='{top}' x2='{left}' y2='{bottom}' stroke='#999'/>",
        f"<text class='axis' x='{(left + right) / 2:.0f}' y='{bottom + 36}' text-anchor='middle'>"
        "batch size (samples per run)</text>",
        f"<text class='axis' x='16' y='{middle:.0f}' text-anchor='middle' "
        f"transform='rotate(-90 16 {middle:.0f})'>{html_text(y_title)}</text>",
    ]


def _lines(chart: str, title: str, series: list[tuple[str, list[dict]]]) -> str:
    """A line per series over the batch sizes, each with its own colour, dash and marker shape;
    series are set a few pixels apart along x so that equal values stay visible side by side."""
    batches = sorted({p["batch_size"] for _, pts in series for p in pts})
    position, ticks, log = y_axis([p["throughput"] for _, pts in series for p in pts])
    left, plot_right, legend, top, h = 80, W - 20, W - 4, 40, 280
    x_of = {b: left + (i + 0.5) * (plot_right - left) / len(batches) for i, b in enumerate(batches)}
    y_of = lambda v: h - (h - top) * min(1.0, max(0.0, position(v)))
    marks = _axes(
        x_of,
        {t: y_of(t) for t in ticks},
        (left, top, plot_right, h),
        f"samples / s{' (log scale)' if log else ''}",
    )
    for i, (name, pts) in enumerate(series):
        color, dash, shape = series_style(i)
        dx = (i - (len(series) - 1) / 2) * 5
        marks += series_marks(
            chart,
            name,
            i,
            5,
            [
                (
                    x_of[p["batch_size"]] + dx,
                    y_of(p["throughput"]),
                    f"data-batch='{p['batch_size']}'",
                    p["throughput"],
                    f"{name}, batch {p['batch_size']}: {p['throughput']:,.1f} samples/s "
                    f"(p50 {p['p50_ms']:.3f} ms)",
                )
                for p in pts
            ],
        )
        y = top + i * 20
        marks.append(
            f"<line x1='{legend}' y1='{y}' x2='{legend + 28}' y2='{y}' stroke='{color}' stroke-width='2' "
            f"stroke-dasharray='{dash}'/>"
            f"<path d='{marker_path(shape, legend + 14, y, 5)}' fill='{color}' stroke='#fff'/>"
            f"<text x='{legend + 34}' "
            f"y='{y + 4}'><title>{html_text(name)}</title>{html_text(_short(name, 20))}</text>"
        )
    width, height = W + 160, max(h, top + 20 * len(series)) + 46
    return (
        f"<figure><svg class='chart' data-chart='{chart}' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}'>"
        f"<text x='0' y='14' class='title'>{html_text(title)}</text>{''.join(marks)}</svg></figure>"
    )


def series_style(i: int) -> tuple[str, str, str]:
    """The colour, dash and marker shape of the i-th series of a line chart."""
    return COLORS[i % len(COLORS)], DASHES[i % len(DASHES)], MARKERS[i % len(MARKERS)]


def series_marks(
    chart: str, name: str, i: int, radius: float, points: list[tuple[float, float, str, float, str]]
) -> list[str]:
    """A series of a line chart: its line and a marker per point (x, y, more data attributes,
    value, tooltip), each point carrying its value in `data-value`."""
    color, dash, shape = series_style(i)
    marks = (
        [
            f"<polyline fill='none' stroke='{color}' stroke-width='2' stroke-dasharray='{dash}' "
            f"points='{' '.join(f'{x:.1f},{y:.1f}' for x, y, *_ in points)}'/>"
        ]
        if len(points) > 1
        else []
    )
    return marks + [
        f"<path class='point' data-chart='{html_text(chart)}' data-label='{html_text(name)}' {attrs} "
        f"data-value='{value}' d='{marker_path(shape, x, y, radius)}' fill='{color}' stroke='#fff' "
        f"stroke-width='1'><title>{html_text(tip)}</title></path>"
        for x, y, attrs, value, tip in points
    ]


def _sensitivity(name: str, data: dict) -> str:
    """A bar per layer, most sensitive first: the SQNR gained by keeping that layer alone in float."""
    rows = [
        (r["layer"], r["sqnr_gain_db"])
        for r in data["layers"]
        if isinstance(r.get("sqnr_gain_db"), (int, float))
    ]
    if not rows:
        return ""
    chart = _bars(
        f"sensitivity:{name}",
        f"{name}: SQNR gain with one layer in float (dB), most sensitive first",
        rows,
        "{:+.1f} dB",
        label_w=230,
        base=min(0.0, min(v for _, v in rows)),
    )
    return f"<h2>Sensitivity of {html_text(name)}</h2>{chart}"


def _operators(name: str, profile: dict) -> str:
    """The top operators' self time per run in ms, each with its share of the profiled total."""
    ops = profile["operators"][:8]
    chart = _bars(
        f"operators:{name}",
        f"{name} — {profile['tool']}: self time per run (ms, % of {profile['total_ms']:.3f} ms)",
        [(o["name"], o["self_ms"]) for o in ops],
        "{:.3f} ms",
        label_w=230,
        labels=[f"{o['self_ms']:.3f} ms · {o['share']:.1%}" for o in ops],
    )
    return chart.replace("<figure>", f"<figure data-profile='{html_text(name)}'>", 1)


def _notes(report: dict) -> str:
    items = [
        f"<li>skipped <code>{html_text(s['name'])}</code>: {html_text(s['reason'])}</li>"
        for s in report["skipped"]
    ]
    items += [
        f"<li>not applicable <code>{html_text(s['name'])}</code>: {html_text(s['reason'])}</li>"
        for s in report.get("not_applicable", [])
    ]
    total = report["data"]["validation"]["samples"]
    items += [
        f"<li>{html_text(line)}</li>"
        for a in report["artifacts"]
        if (line := subset_line(a["name"], a["parity"]["samples"], total))
    ]
    items += [
        f"<li><code>{html_text(a['name'])}</code> {html_text(stage)}: {html_text(facts_line(facts))}</li>"
        for a in report["artifacts"]
        for stage, facts in a.get("stage_facts", {}).items()
    ]
    if report.get("engine"):
        reason = report["engine"].get("reason")
        items.append(
            "<li>TensorRT engine: "
            f"{html_text(report['engine']['status'])}{': ' + html_text(reason) if reason else ''}</li>"
        )
    return f"<h2>Notes</h2><ul>{''.join(items)}</ul>" if items else ""


CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}.passed{color:#2a7}.failed{color:#c33}.built{color:#a70}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.primary{background:#eef6ee}.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}svg text{font-size:12px}svg .title{font-weight:600}svg .axis{fill:#555}\
code{background:#f4f4f4;padding:0 3px}
ul.alerts{list-style:none;padding:0}ul.alerts li{padding:6px 10px;margin:4px 0;border-radius:4px}
li.warning{background:#fff4d6;border-left:4px solid #e0a100}\
li.ties{background:#f3eefa;border-left:4px solid #8e6cbf}\
li.recovery{background:#eaf2fb;border-left:4px solid #4e79a7}
li.proxy{background:#f1f1f1;border-left:4px solid #999}\
li.metric{background:#eef6ee;border-left:4px solid #59a14f;font-weight:600}\
tr.output td{color:#555;font-size:13px}"""

SCRIPT = """window.addEventListener('load',function(){var out={};
document.querySelectorAll('svg.chart').forEach(function(svg){var n=0;
svg.querySelectorAll('.bar,.point').forEach(function(m){\
var b=m.getBoundingClientRect();if(b.width>0&&b.height>0)n++;});
var r=svg.getBoundingClientRect();out[svg.dataset.chart]=\
{marks:n,width:Math.round(r.width),height:Math.round(r.height)};});
document.body.setAttribute('data-rendered',JSON.stringify(out));});"""
