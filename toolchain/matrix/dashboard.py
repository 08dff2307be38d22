"""`matrix.html`: one self-contained page (inline CSS and SVG, no network) drawn from the history.

At the top, the newest run's alarms; then the matrix, a row per model and a column per target,
each cell's verdict in colour and words with links to its report.html and log; then, per cell,
trend charts of accuracy, SQNR and batch-1 p50 latency over every run, a line per artifact.
Every point carries its number in `data-value` and its run in `data-run`, and the data the page
was drawn from is embedded as JSON, so that a script or a test can check the page against the
database. The same inline script as report.html's records how many marks each chart laid out.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from toolchain.core.errors import ToolchainError
from toolchain.matrix.alarms import spread
from toolchain.matrix.history import History
from toolchain.reporting.html import CSS, SCRIPT, html_text, marker_path, series_marks, series_style, y_axis

WORDS = {
    "passed": "PASSED",
    "failed": "FAILED",
    "not_judged": "NOT JUDGED",
    "error": "ERROR",
    "crashed": "CRASHED",
}
TONE = {"passed": "passed", "failed": "failed", "not_judged": "built", "error": "failed", "crashed": "failed"}
TRENDS = (
    ("quality", "accuracy (top-1 agreement without labels)", "{:.2%}"),
    ("sqnr_db", "SQNR (dB)", "{:.1f} dB"),
    ("latency_ms", "batch-1 p50 latency, median of the repeats (ms)", "{:.3f} ms"),
)


def write_dashboard(history: History, out: Path, name: str | None = None) -> Path:
    """Write ``out`` for matrix ``name`` (default: the matrix of the newest run)."""
    runs = history.runs()
    if not runs:
        raise ToolchainError(f"the history {history.shown} holds no matrix run yet")
    name = name or runs[-1].matrix
    runs = [r for r in runs if r.matrix == name]
    if not runs:
        raise ToolchainError(
            f"the history holds no run of matrix `{name}`; "
            f"it has {', '.join(sorted({r.matrix for r in history.runs()}))}"
        )
    data = dashboard_data(history, runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data, out.parent))
    return out


def dashboard_data(history: History, runs: list) -> dict[str, Any]:
    """Everything the page shows, as plain data: the newest run (of each shard, when the matrix
    runs sharded by target), its cells and alarms, and each cell's trend points over every run."""
    latest = runs[-1]
    newest = {r.shard: r.id for r in runs}  # the last run of each shard
    cells = history.cells_of([r.id for r in runs])
    trends: dict[str, dict[str, list[dict]]] = {}
    for c in cells:
        for a in c["artifacts"].values():
            quality = a["accuracy"] if a["accuracy"] is not None else a["top1_agreement"]
            point = {
                "run": c["run_id"],
                "started": c["started"],
                "quality": quality,
                "sqnr_db": a["sqnr_db"],
                "latency_ms": spread(a)[0],
            }
            trends.setdefault(c["key"], {}).setdefault(a["name"], []).append(point)
    # the newest of each cell
    now = list({c["key"]: c for c in cells if c["run_id"] in newest.values()}.values())
    # a cell built again since: its old alarms are history
    return {
        "matrix": latest.matrix,
        "run": {
            "id": latest.id,
            "status": latest.status,
            "started": latest.started.isoformat(timespec="seconds"),
            "executor": latest.executor,
            "host_cpu": latest.host_cpu,
            "toolchain_version": latest.toolchain_version,
            "toolchain_commit": latest.toolchain_commit,
            "cells_total": latest.cells_total,
        },
        "runs": [r.id for r in runs],
        "shown_runs": sorted(newest.values()),
        "cells": [
            {
                k: c[k]
                for k in ("key", "model", "target", "status", "verdict", "reason", "folder", "log", "seconds")
            }
            | {"primary": next((n for n, a in c["artifacts"].items() if a["is_primary"]), None)}
            for c in now
        ],
        "alarms": [
            {k: a[k] for k in ("key", "artifact", "kind", "message", "baseline_run_id", "changes")}
            for run_id in sorted(newest.values())
            for a in history.alarms_of(run_id)
            if a["cell_id"] in {c["id"] for c in now}
        ],
        "trends": trends,
    }


def render(data: dict[str, Any], base: Path) -> str:
    run = data["run"]
    counts = {s: sum(c["status"] == s for c in data["cells"]) for s in WORDS}
    summary = ", ".join(f"{n} {WORDS[s].lower()}" for s, n in counts.items() if n)
    tone = "failed" if data["alarms"] or counts["failed"] + counts["error"] + counts["crashed"] else "passed"
    commit = f" at {html_text(run['toolchain_commit'][:12])}" if run["toolchain_commit"] else ""
    runs, shown = len(data["runs"]), data["shown_runs"]
    shards = (
        f"; cells of the newest run of each shard: runs {', '.join(map(str, shown))}"
        if len(shown) > 1
        else ""
    )
    parts = [
        f"<h1>Matrix {html_text(data['matrix'])}, run {run['id']}: "
        f"<span class='{tone}'>{len(data['alarms'])} alarm{'s' * (len(data['alarms']) != 1)}</span></h1>",
        f"<p>{html_text(summary)} of {len(data['cells'])} cells; started {html_text(run['started'])} "
        f"({html_text(run['status'])}); {html_text(run['executor'])}; "
        f"host {html_text(run['host_cpu'] or 'unknown')}; "
        "toolchain "
        f"{html_text(run['toolchain_version'] or '?')}"
        f"{commit}; {runs} run{'s' * (runs != 1)} in the history{shards}"
        ".</p>",
        _alarms(data["alarms"]),
        _grid(data["cells"], base, data["alarms"]),
        "<h2>Trends per cell</h2>",
        *[_cell_trends(key, series) for key, series in data["trends"].items()],
    ]
    blob = json.dumps(_plain(data), allow_nan=False).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Matrix {html_text(data["matrix"])}, run {run["id"]}</title>
<style>{CSS}{EXTRA_CSS}</style></head>
<body>
{"".join(parts)}
<script type="application/json" id="matrix-json">{blob}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def _alarms(alarms: list[dict]) -> str:
    if not alarms:
        return "<p class='passed'>No regression against each cell's last passing run.</p>"
    items = [
        f"<li class='alarm' data-key='{html_text(a['key'])}' "
        f"data-kind='{html_text(a['kind'])}'><b>{html_text(a['key'])}</b>"
        f"{' ' + html_text(a['artifact']) if a['artifact'] else ''} [{html_text(a['kind'])}]: "
        f"{html_text(a['message'])}<br><small>changed since run {a['baseline_run_id']}: "
        f"{html_text(', '.join(a['changes']) or 'nothing recorded')}</small></li>"
        for a in alarms
    ]
    return f"<h2>Alarms</h2><ul class='alerts'>{''.join(items)}</ul>"


def _grid(cells: list[dict], base: Path, alarms: list[dict]) -> str:
    models = list(dict.fromkeys(c["model"] for c in cells))
    targets = list(dict.fromkeys(c["target"] for c in cells))
    by = {(c["model"], c["target"]): c for c in cells}
    head = "<tr><th>model</th>" + "".join(f"<th>{html_text(t)}</th>" for t in targets) + "</tr>"
    rows = []
    for m in models:
        tds = []
        for t in targets:
            c = by.get((m, t))
            if c is None:
                tds.append("<td class='none'>—</td>")
                continue
            report = Path(c["folder"]) / "report.html" if c["folder"] else None
            links = [
                f"<a href='{html_text(_link(report, base))}'>report</a>"
                if report and report.is_file()
                else "",
                f"<a href='{html_text(_link(Path(c['log']), base))}'>log</a>",
            ]
            detail = c["verdict"] if c["status"] in ("passed", "failed", "not_judged") else c["reason"]
            detail = "" if detail == WORDS[c["status"]] else detail
            rung = [a["kind"] for a in alarms if a["key"] == c["key"]]
            flag = (
                f" <span class='alarmed' data-alarms='{len(rung)}'>⚠ {html_text(', '.join(rung))}</span>"
                if rung
                else ""
            )
            tds.append(
                f"<td class='cell {c['status']}' data-key='{html_text(c['key'])}' "
                f"data-status='{c['status']}'><b class='{TONE[c['status']]}'>{WORDS[c['status']]}</b>{flag}"
                f"<br><small>{html_text(detail or '')}</small><br>"
                f"{html_text(c['primary'] or '')} {' · '.join(filter(None, links))} "
                f"<small>{c['seconds']:.0f} s</small></td>"
            )
        rows.append(f"<tr><td>{html_text(m)}</td>{''.join(tds)}</tr>")
    return f"<h2>Verdict per cell</h2><table class='grid'>{head}{''.join(rows)}</table>"


def _link(path: Path, base: Path) -> str:
    return os.path.relpath(path.resolve(), base.resolve())


def _cell_trends(key: str, series: dict[str, list[dict]]) -> str:
    charts = [_trend(f"trend:{key}:{field}", title, series, field, fmt) for field, title, fmt in TRENDS]
    return f"<h3>{html_text(key)}</h3><div class='row'>{''.join(charts)}</div>"


def _trend(chart: str, title: str, series: dict[str, list[dict]], field: str, fmt: str) -> str:
    """A line per artifact over the runs; non-finite values (an exact FP32 copy's SQNR) are left out."""
    points = {n: [p for p in pts if _shown_value(p[field])] for n, pts in series.items()}
    runs = sorted({p["run"] for pts in points.values() for p in pts}) or [0]
    values = [p[field] for pts in points.values() for p in pts]
    position, ticks, log = _trend_axis(values, 1.0 if field == "quality" else None)
    left, right, top, h, w = 70, 330, 30, 190, 480
    x_of = {r: left + (i + 0.5) * (right - left) / len(runs) for i, r in enumerate(runs)}
    y_of = lambda v: h - (h - top) * min(1.0, max(0.0, position(v)))
    marks = [
        f"<line x1='{left}' y1='{y_of(t):.1f}' x2='{right}' y2='{y_of(t):.1f}' stroke='#eee'/>"
        f"<text x='{left - 6}' y='{y_of(t) + 4:.1f}' text-anchor='end'>{html_text(_tick(t, fmt))}</text>"
        for t in ticks
    ]
    marks += [f"<text x='{x:.1f}' y='{h + 16}' text-anchor='middle'>{r}</text>" for r, x in x_of.items()]
    marks.append(
        f"<line x1='{left}' y1='{h}' x2='{right}' y2='{h}' stroke='#999'/>"
        f"<text class='axis' x='{(left + right) / 2:.0f}' y='{h + 32}' text-anchor='middle'>run</text>"
    )
    for i, (name, pts) in enumerate(points.items()):
        color, _, shape = series_style(i)
        dx = (i - (len(points) - 1) / 2) * 4
        marks += series_marks(
            chart,
            name,
            i,
            4,
            [
                (
                    x_of[p["run"]] + dx,
                    y_of(p[field]),
                    f"data-run='{p['run']}'",
                    p[field],
                    f"{name}, run {p['run']}: {fmt.format(p[field])}",
                )
                for p in pts
            ],
        )
        ly = top + i * 18
        marks.append(
            f"<path d='{marker_path(shape, right + 16, ly, 4)}' fill='{color}'/>"
            f"<text x='{right + 26}' y='{ly + 4}'>{html_text(name)}</text>"
        )
    height = h + 40
    return (
        f"<figure><svg class='chart' data-chart='{html_text(chart)}' width='{w}' height='{height}' "
        f"viewBox='0 0 {w} {height}'>"
        f"<text x='0' y='14' class='title'>{html_text(title)}{' (log scale)' if log else ''}</text>"
        f"{''.join(marks)}</svg></figure>"
    )


def _trend_axis(values: list[float], upper: float | None):
    """Like report.html's axis, but a flat series (every run equal) gets a band around it, kept
    under ``upper`` (100 % for accuracy)."""
    lo, hi = min(values, default=0.0), max(values, default=1.0)
    if lo > 0 and hi / lo > 20:
        return y_axis(values)
    pad = (hi - lo) * 0.15 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad if upper is None else min(upper, hi + pad)
    step = 10 ** math.floor(math.log10((hi - lo) / 4))
    # round ticks: 98.0 %, 98.5 %, ...
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / 4 <= step * m)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    ticks = [lo + k * step for k in range(round((hi - lo) / step) + 1)]
    return (lambda v: (v - lo) / (hi - lo)), ticks, False


def _tick(t: float, fmt: str) -> str:
    return fmt.replace(" ms", "").replace(" dB", "").format(t)


def _shown_value(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _plain(v: Any) -> Any:
    """JSON without NaN / Infinity (which browsers' JSON.parse refuse): written "nan" /
    "inf", as report.json does."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


EXTRA_CSS = """table.grid td{text-align:left;vertical-align:top;min-width:180px}\
td.cell.passed{background:#eef6ee}
td.cell.failed,td.cell.error,td.cell.crashed{background:#fbeaea}td.cell.not_judged{background:#fff4d6}
li.alarm{background:#fbeaea;border-left:4px solid #c33}.alarmed{color:#c33;font-weight:600}\
h3{font-size:14px;margin:18px 0 4px}"""
