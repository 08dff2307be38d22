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
from pathlib import Path
from typing import Any

from .report import facts_line, parity_verdict

W, ROW, PAD = 560, 22, 150  # chart width, bar row height, label column
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def write_html(folder: Path, report: dict[str, Any]) -> None:
    """`report.html` for the report dictionary (as written to report.json) and the folder's profiles."""
    entries = [("fp32_reference", report["reference"])] + [(a["name"], a) for a in report["artifacts"]]
    profiles = {n: json.loads((folder / e["profile"]).read_text()) for n, e in entries if e.get("profile")}
    (folder / "report.html").write_text(render(report, profiles))


def render(report: dict[str, Any], profiles: dict[str, dict[str, Any]]) -> str:
    names = ["fp32_reference"] + [a["name"] for a in report["artifacts"]]
    ref = report["reference"]
    rows = [("fp32_reference", ref)] + [(a["name"], a) for a in report["artifacts"]]
    verdict = report["verdict"]
    tone = {True: "passed", False: "failed", None: "built"}[report["passed"]]  # the heading's colour
    parts = [
        f"<h1>{_e(report['model']['name'])} → {_e(report['target'])}: <span class='{tone}'>{verdict}</span></h1>",
        f"<p>Model <code>{_e(report['model']['source'])}</code> (weights: {_e(report['model'].get('weights', ''))}), input "
        f"{'x'.join(map(str, report['model']['input_shape']))}; primary artifact: <b>{_e(report['primary'] or 'none')}</b>; "
        f"built in {report['build_seconds']} s.</p>",
        _parity_table(report),
        "<h2>Latency and size, FP32 vs each artifact</h2><div class='row'>",
        _bars("latency", "latency p50, batch 1 (ms)", [(n, r["latency_ms"]) for n, r in rows], "{:.3f}"),
        _bars("size", "size on disk (MB)", [(n, r["size_bytes"]) for n, r in rows], "{:.2f}", scale=1 / 2**20),
        "</div>",
        _latency_table(rows),
        "<h2>Throughput vs batch size</h2>",
        _lines("throughput", "samples / s", [(n, r["bench"]["sweep"]) for n, r in rows]),
        "<h2>Where the time goes: top operators by self time (batch 1)</h2><div class='row'>",
        *[_operators(n, profiles[n]) for n in names if n in profiles],
        "</div>",
        _notes(report),
    ]
    data = json.dumps(report).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(report['model']['name'])} → {_e(report['target'])}</title>
<style>{CSS}</style></head>
<body>
{''.join(parts)}
<script type="application/json" id="report-json">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _parity_table(report: dict) -> str:
    head = "<tr><th>artifact</th><th>format</th><th>precision</th><th>SQNR dB</th><th>cosine</th><th>top-1 agreement</th><th>accuracy</th><th>parity</th></tr>"
    ref = report["reference"]
    acc = "" if ref["accuracy"] is None else f"{ref['accuracy']:.2%}"
    body = [f"<tr><td>fp32_reference</td><td>{_e(ref['format'])}</td><td>fp32</td><td></td><td></td><td></td><td>{acc}</td><td></td></tr>"]
    for a in report["artifacts"]:
        p = a["parity"]
        verdict = parity_verdict(p["passed"], p["failures"])
        cell = lambda v, f: "" if v is None else (v if isinstance(v, str) else f.format(v))  # "nan" / "inf" as written
        body.append(
            f"<tr class='{'primary' if a['primary'] else ''}'><td>{_e(a['name'])}{' ★' if a['primary'] else ''}</td><td>{_e(a['format'])}</td>"
            f"<td>{_e(a['precision'])}</td><td data-key='sqnr_db'>{cell(p['sqnr_db'], '{:.1f}')}</td><td>{cell(p['cosine'], '{:.4f}')}</td>"
            f"<td>{cell(p['top1_agreement'], '{:.2%}')}</td><td>{cell(p['accuracy'], '{:.2%}')}</td><td>{_e(verdict)}</td></tr>")
    return f"<h2>Parity against FP32</h2><table>{head}{''.join(body)}</table>"


def _latency_table(rows) -> str:
    head = "<tr><th></th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>best batch</th><th>peak memory MB</th><th>threads</th></tr>"
    body = []
    for name, r in rows:
        b = r["bench"]
        one = b["sweep"][0]
        mem = "" if b["peak_memory_bytes"] is None else f"{b['peak_memory_bytes'] / 2**20:.1f}"
        body.append(f"<tr><td>{_e(name)}</td><td>{one['p50_ms']:.3f}</td><td>{one['p95_ms']:.3f}</td><td>{one['p99_ms']:.3f}</td>"
                    f"<td>{b['best_batch'] if b['best_batch'] is not None else 'none fits'}</td><td>{mem}</td><td>{b['threads']}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _bars(chart: str, title: str, values: list[tuple[str, float]], fmt: str, scale: float = 1.0, label_w: int = PAD) -> str:
    top = max((v * scale for _, v in values), default=0) or 1.0
    span = W - label_w - 70
    marks = []
    for i, (name, value) in enumerate(values):
        y = 24 + i * ROW
        w = max(1.0, value * scale / top * span)
        marks.append(
            f"<text x='{label_w - 6}' y='{y + 14}' text-anchor='end'>{_e(name)}</text>"
            f"<rect class='bar' data-chart='{chart}' data-label='{_e(name)}' data-value='{value}' x='{label_w}' y='{y + 2}' "
            f"width='{w:.1f}' height='{ROW - 6}' fill='{COLORS[i % len(COLORS)]}'><title>{_e(name)}: {fmt.format(value * scale)}</title></rect>"
            f"<text x='{label_w + w + 4:.1f}' y='{y + 14}'>{fmt.format(value * scale)}</text>")
    height = 30 + len(values) * ROW
    return (f"<figure><svg class='chart' data-chart='{chart}' width='{W}' height='{height}' viewBox='0 0 {W} {height}'>"
            f"<text x='0' y='14' class='title'>{_e(title)}</text>{''.join(marks)}</svg></figure>")


def _lines(chart: str, title: str, series: list[tuple[str, list[dict]]]) -> str:
    batches = sorted({p["batch_size"] for _, pts in series for p in pts})
    top = max((p["throughput"] for _, pts in series for p in pts), default=0) or 1.0
    left, right, h, bottom = 60, W + 120, 260, 30
    x_of = {b: left + (i + 0.5) * (right - left - 140) / len(batches) for i, b in enumerate(batches)}
    y_of = lambda v: 20 + (h - 20) * (1 - v / top)
    marks = [f"<line x1='{left}' y1='{h}' x2='{right - 140}' y2='{h}' stroke='#999'/>"]
    marks += [f"<text x='{x:.1f}' y='{h + 18}' text-anchor='middle'>batch {b}</text>" for b, x in x_of.items()]
    marks += [f"<text x='{left - 6}' y='{y_of(v) + 4:.1f}' text-anchor='end'>{v:,.0f}</text>" for v in (0, top / 2, top)]
    for i, (name, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        coords = [(x_of[p["batch_size"]], y_of(p["throughput"]), p) for p in pts]
        if len(coords) > 1:
            marks.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{' '.join(f'{x:.1f},{y:.1f}' for x, y, _ in coords)}'/>")
        marks += [f"<circle class='point' data-chart='{chart}' data-label='{_e(name)}' data-batch='{p['batch_size']}' data-value='{p['throughput']}' "
                  f"cx='{x:.1f}' cy='{y:.1f}' r='4' fill='{color}'><title>{_e(name)}, batch {p['batch_size']}: {p['throughput']:,.1f} samples/s "
                  f"(p50 {p['p50_ms']:.3f} ms)</title></circle>" for x, y, p in coords]
        marks.append(f"<text x='{right - 130}' y='{30 + i * 18}' fill='{color}'>■ {_e(name)}</text>")
    return (f"<figure><svg class='chart' data-chart='{chart}' width='{right}' height='{h + bottom}' viewBox='0 0 {right} {h + bottom}'>"
            f"<text x='0' y='12' class='title'>{_e(title)}</text>{''.join(marks)}</svg></figure>")


def _operators(name: str, profile: dict) -> str:
    ops = profile["operators"][:8]
    chart = _bars(f"operators:{name}", f"{name} — {profile['tool']}, {profile['total_ms']:.3f} ms / run",
                  [(o["name"][:28], o["self_ms"]) for o in ops], "{:.3f}", label_w=210)
    return chart.replace("<figure>", f"<figure data-profile='{_e(name)}'>", 1)


def _notes(report: dict) -> str:
    items = [f"<li>skipped <code>{_e(s['name'])}</code>: {_e(s['reason'])}</li>" for s in report["skipped"]]
    items += [f"<li><code>{_e(a['name'])}</code> {_e(stage)}: {_e(facts_line(facts))}</li>"
              for a in report["artifacts"] for stage, facts in a.get("stage_facts", {}).items()]
    items += [f"<li>warning: {_e(w)}</li>" for w in report["warnings"]]
    if report.get("engine"):
        items.append(f"<li>TensorRT engine: {_e(report['engine']['status'])} ({_e(report['engine'].get('reason', ''))})</li>")
    return f"<h2>Notes</h2><ul>{''.join(items)}</ul>" if items else ""


CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}.passed{color:#2a7}.failed{color:#c33}.built{color:#a70}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.primary{background:#eef6ee}.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}svg text{font-size:12px}svg .title{font-weight:600}code{background:#f4f4f4;padding:0 3px}"""

SCRIPT = """window.addEventListener('load',function(){var out={};
document.querySelectorAll('svg.chart').forEach(function(svg){var n=0;
svg.querySelectorAll('.bar,.point').forEach(function(m){var b=m.getBoundingClientRect();if(b.width>0&&b.height>0)n++;});
var r=svg.getBoundingClientRect();out[svg.dataset.chart]={marks:n,width:Math.round(r.width),height:Math.round(r.height)};});
document.body.setAttribute('data-rendered',JSON.stringify(out));});"""
