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

from .report import facts_line, output_label, parity_verdict

W, ROW, PAD = 560, 22, 150  # chart width, bar row height, label column
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def write_html(folder: Path, report: dict[str, Any]) -> None:
    """`report.html` for the report dictionary (as written to report.json) and the folder's
    profiles and sensitivity files."""
    entries = [("fp32_reference", report["reference"])] + [(a["name"], a) for a in report["artifacts"]]
    profiles = {n: json.loads((folder / e["profile"]).read_text()) for n, e in entries if e.get("profile")}
    sensitivity = {a["name"]: json.loads((folder / a["recovery"]["sensitivity"]).read_text())
                   for a in report["artifacts"] if (a.get("recovery") or {}).get("sensitivity")}
    (folder / "report.html").write_text(render(report, profiles, sensitivity))


def render(report: dict[str, Any], profiles: dict[str, dict[str, Any]], sensitivity: dict[str, dict] | None = None) -> str:
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
        _alerts(report),
        _parity_table(report),
        "<h2>Latency and size, FP32 vs each artifact</h2><div class='row'>",
        _bars("latency", "latency p50, batch 1 (ms)", [(n, r["latency_ms"]) for n, r in rows], "{:.3f} ms"),
        _bars("size", "size on disk (MB)", [(n, r["size_bytes"]) for n, r in rows], "{:.2f} MB", scale=1 / 2**20),
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
        if len(p.get("outputs", [])) > 1:
            body += [f"<tr class='output'><td>&nbsp;&nbsp;output {_e(output_label(_Output(o)))}</td><td></td><td></td>"
                     f"<td>{cell(o['sqnr_db'], '{:.1f}')}</td><td>{cell(o['cosine'], '{:.4f}')}</td>"
                     f"<td>{cell(o['top1_agreement'], '{:.2%}')}</td><td>{cell(o['accuracy'], '{:.2%}')}</td>"
                     f"<td>{_e(parity_verdict(o['passed'], o['failures']))}</td></tr>" for o in p["outputs"]]
    return f"<h2>Parity against FP32</h2><table>{head}{''.join(body)}</table>"


class _Output:
    """report.json's output entry with the attribute names `output_label` reads."""

    def __init__(self, o: dict) -> None:
        self.index, self.name, self.role, self.role_inferred = o["index"], o["name"], o["role"], o["role_inferred"]


def _alerts(report: dict) -> str:
    """Beside the verdict: recovery's line per artifact, the warnings, and whether host parity is a proxy."""
    items = []
    if report.get("metric"):
        m = report["metric"]
        scores = "; ".join(f"{a['name']} {_num(a['parity']['metric'].get('value'))} ({'pass' if a['parity']['metric'].get('passed') else 'fail' if a['parity']['metric'].get('passed') is False else 'not judged'})"
                           for a in report["artifacts"] if a["parity"].get("metric"))
        items.append(f"<li class='metric'>metric <code>{_e(m['name'])}</code> (tolerance {m['max_drop']:g} {_e(m['drop_is'])}): "
                     f"FP32 {_num(m['fp32'])}; {_e(scores)}</li>")
    items += [f"<li class='recovery'>{_e(a['recovery']['summary'])}</li>" for a in report["artifacts"] if a.get("recovery")]
    items += [f"<li class='warning'>⚠ {_e(w)}</li>" for w in report["warnings"]]
    cpu = report.get("cpu") or {}
    if cpu.get("proxy") and not cpu.get("target_isa"):  # an x86 mismatch is among the warnings already
        items.append(f"<li class='proxy'>host parity is a proxy: {_e(cpu['proxy_reason'])}</li>")
    return f"<ul class='alerts'>{''.join(items)}</ul>" if items else ""


def _latency_table(rows) -> str:
    head = "<tr><th></th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>best batch</th><th>peak memory MB</th><th>threads</th></tr>"
    body = []
    for name, r in rows:
        b = r["bench"]
        one = b["sweep"][0]
        mem = _memory(b["peak_memory_bytes"])
        body.append(f"<tr><td>{_e(name)}</td><td>{one['p50_ms']:.3f}</td><td>{one['p95_ms']:.3f}</td><td>{one['p99_ms']:.3f}</td>"
                    f"<td>{b['best_batch'] if b['best_batch'] is not None else 'none fits'}</td><td>{mem}</td><td>{b['threads']}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _num(v) -> str:
    return "n/a" if v is None else (v if isinstance(v, str) else f"{v:.6g}")


def _memory(n: int | None) -> str:
    """Resident memory added; pages a runtime reuses from earlier work are not new, so a small model can add none."""
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f}" if n >= 2**20 / 10 else "<span title='resident memory added while loading and running: under 0.1 MB (pages already resident are reused)'>&lt; 0.1</span>"


def _short(name: str, limit: int) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _bars(chart: str, title: str, values: list[tuple[str, float]], fmt: str, scale: float = 1.0, label_w: int = PAD,
          limit: int = 24, base: float = 0.0) -> str:
    """One bar per (full name, value), its length from ``base``; labels longer than ``limit`` end in
    an ellipsis, the full name is in the bar's tooltip and its data-label."""
    top = max(((v - base) * scale for _, v in values), default=0) or 1.0
    span = W - label_w - 90
    marks = []
    for i, (name, value) in enumerate(values):
        y = 24 + i * ROW
        w = max(1.0, (value - base) * scale / top * span)
        marks.append(
            f"<text x='{label_w - 6}' y='{y + 14}' text-anchor='end'><title>{_e(name)}</title>{_e(_short(name, limit))}</text>"
            f"<rect class='bar' data-chart='{chart}' data-label='{_e(name)}' data-value='{value}' x='{label_w}' y='{y + 2}' "
            f"width='{w:.1f}' height='{ROW - 6}' fill='{COLORS[i % len(COLORS)]}'><title>{_e(name)}: {fmt.format(value * scale)}</title></rect>"
            f"<text x='{label_w + w + 4:.1f}' y='{y + 14}'>{fmt.format(value * scale)}</text>")
    height = 30 + len(values) * ROW
    return (f"<figure><svg class='chart' data-chart='{chart}' width='{W}' height='{height}' viewBox='0 0 {W} {height}'>"
            f"<text x='0' y='14' class='title'>{_e(title)}</text>{''.join(marks)}</svg></figure>")


def _throughput(series: list[tuple[str, list[dict]]]) -> str:
    """Samples per second: bars when the target runs one batch size, lines over batch sizes otherwise."""
    batches = sorted({p["batch_size"] for _, pts in series for p in pts})
    if len(batches) == 1:
        bars = _bars("throughput", f"samples / s at batch {batches[0]}", [(n, pts[0]["throughput"]) for n, pts in series], "{:,.1f} /s")
        return bars.replace("class='bar' data-chart='throughput'", f"class='bar' data-chart='throughput' data-batch='{batches[0]}'")
    return _lines("throughput", "samples / s by batch size", series)


DASHES = ["", "6 3", "2 3", "8 3 2 3", "1 2", "10 4"]


def _lines(chart: str, title: str, series: list[tuple[str, list[dict]]]) -> str:
    batches = sorted({p["batch_size"] for _, pts in series for p in pts})
    top = max((p["throughput"] for _, pts in series for p in pts), default=0) or 1.0
    left, right, h, bottom, plot_top = 70, W + 160, 280, 30, 40
    x_of = {b: left + (i + 0.5) * (right - left - 180) / len(batches) for i, b in enumerate(batches)}
    y_of = lambda v: plot_top + (h - plot_top) * (1 - v / top)
    marks = [f"<line x1='{left}' y1='{h}' x2='{right - 180}' y2='{h}' stroke='#999'/>",
             f"<line x1='{left}' y1='{plot_top}' x2='{left}' y2='{h}' stroke='#999'/>"]
    marks += [f"<text x='{x:.1f}' y='{h + 18}' text-anchor='middle'>batch {b}</text>" for b, x in x_of.items()]
    marks += [f"<text x='{left - 6}' y='{y_of(v) + 4:.1f}' text-anchor='end'>{v:,.0f}</text>" for v in (0, top / 2, top)]
    for i, (name, pts) in enumerate(series):
        color, dash, radius = COLORS[i % len(COLORS)], DASHES[i % len(DASHES)], max(3, 7 - i)  # earlier series drawn larger: none hides another
        coords = [(x_of[p["batch_size"]], y_of(p["throughput"]), p) for p in pts]
        if len(coords) > 1:
            marks.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' stroke-dasharray='{dash}' "
                         f"points='{' '.join(f'{x:.1f},{y:.1f}' for x, y, _ in coords)}'/>")
        marks += [f"<circle class='point' data-chart='{chart}' data-label='{_e(name)}' data-batch='{p['batch_size']}' data-value='{p['throughput']}' "
                  f"cx='{x:.1f}' cy='{y:.1f}' r='{radius}' fill='{color}' fill-opacity='0.8'><title>{_e(name)}, batch {p['batch_size']}: {p['throughput']:,.1f} samples/s "
                  f"(p50 {p['p50_ms']:.3f} ms)</title></circle>" for x, y, p in coords]
        marks.append(f"<text x='{right - 170}' y='{plot_top + i * 18}' fill='{color}'>■ {_e(name)}</text>")
    return (f"<figure><svg class='chart' data-chart='{chart}' width='{right}' height='{h + bottom}' viewBox='0 0 {right} {h + bottom}'>"
            f"<text x='0' y='14' class='title'>{_e(title)}</text>{''.join(marks)}</svg></figure>")


def _sensitivity(name: str, data: dict) -> str:
    """A bar per layer, most sensitive first: the SQNR gained by keeping that layer alone in float."""
    rows = [(r["layer"], r["sqnr_gain_db"]) for r in data["layers"] if isinstance(r.get("sqnr_gain_db"), (int, float))]
    if not rows:
        return ""
    chart = _bars(f"sensitivity:{name}", f"{name}: SQNR gain with one layer in float (dB), most sensitive first",
                  rows, "{:+.1f} dB", label_w=230, limit=32, base=min(0.0, min(v for _, v in rows)))
    return f"<h2>Sensitivity of {_e(name)}</h2>{chart}"


def _operators(name: str, profile: dict) -> str:
    ops = profile["operators"][:8]
    chart = _bars(f"operators:{name}", f"{name} — {profile['tool']}: self time per run (ms), {profile['total_ms']:.3f} ms in all",
                  [(o["name"], o["self_ms"]) for o in ops], "{:.3f} ms", label_w=210, limit=30)
    return chart.replace("<figure>", f"<figure data-profile='{_e(name)}'>", 1)


def _notes(report: dict) -> str:
    items = [f"<li>skipped <code>{_e(s['name'])}</code>: {_e(s['reason'])}</li>" for s in report["skipped"]]
    items += [f"<li><code>{_e(a['name'])}</code> {_e(stage)}: {_e(facts_line(facts))}</li>"
              for a in report["artifacts"] for stage, facts in a.get("stage_facts", {}).items()]
    if report.get("engine"):
        items.append(f"<li>TensorRT engine: {_e(report['engine']['status'])} ({_e(report['engine'].get('reason', ''))})</li>")
    return f"<h2>Notes</h2><ul>{''.join(items)}</ul>" if items else ""


CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}.passed{color:#2a7}.failed{color:#c33}.built{color:#a70}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}tr.primary{background:#eef6ee}.row{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}svg text{font-size:12px}svg .title{font-weight:600}code{background:#f4f4f4;padding:0 3px}
ul.alerts{list-style:none;padding:0}ul.alerts li{padding:6px 10px;margin:4px 0;border-radius:4px}
li.warning{background:#fff4d6;border-left:4px solid #e0a100}li.recovery{background:#eaf2fb;border-left:4px solid #4e79a7}
li.proxy{background:#f1f1f1;border-left:4px solid #999}li.metric{background:#eef6ee;border-left:4px solid #59a14f;font-weight:600}tr.output td{color:#555;font-size:13px}"""

SCRIPT = """window.addEventListener('load',function(){var out={};
document.querySelectorAll('svg.chart').forEach(function(svg){var n=0;
svg.querySelectorAll('.bar,.point').forEach(function(m){var b=m.getBoundingClientRect();if(b.width>0&&b.height>0)n++;});
var r=svg.getBoundingClientRect();out[svg.dataset.chart]={marks:n,width:Math.round(r.width),height:Math.round(r.height)};});
document.body.setAttribute('data-rendered',JSON.stringify(out));});"""
