"""Profiles, `toolchain bench` and report.html: the page shows exactly report.json's numbers,
and headless Chromium lays out every chart."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import toolchain
from toolchain.core.errors import EXIT_USER_ERROR
from toolchain.measure.timing import bench

from .conftest import fast_profile


@pytest.fixture(scope="module")
def x86_build(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    report, folder = toolchain.build(
        str(digits["model"]),
        str(fast_profile(tmp, 64, 64, batch_sizes=None)),
        tmp / "out",
        digits["calibration"],
        digits["validation"],
    )
    return report, folder


class Marks(HTMLParser):
    """Collects every chart mark (data-chart, data-label, data-batch, data-value) and the embedded JSON."""

    def __init__(self):
        super().__init__()
        self.marks, self.json, self._in_json = [], "", False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-value" in a:
            self.marks.append((a["data-chart"], a["data-label"], a.get("data-batch"), float(a["data-value"])))
        self._in_json = a.get("id") == "report-json"

    def handle_data(self, data):
        if self._in_json:
            self.json += data


def _marks(folder):
    parser = Marks()
    parser.feed((folder / "report.html").read_text())
    return parser


def test_every_number_in_the_page_is_the_report_json_number(x86_build):
    _, folder = x86_build
    report = json.loads((folder / "report.json").read_text())
    page = _marks(folder)
    assert json.loads(page.json) == report
    rows = {"fp32_reference": report["reference"], **{a["name"]: a for a in report["artifacts"]}}
    by_chart = {}
    for chart, label, batch, value in page.marks:
        by_chart.setdefault(chart, {})[(label, batch)] = value
    assert by_chart["latency"] == {(n, None): r["latency_ms"] for n, r in rows.items()}
    assert by_chart["size"] == {(n, None): r["size_bytes"] for n, r in rows.items()}
    assert by_chart["throughput"] == {
        (n, str(p["batch_size"])): p["throughput"] for n, r in rows.items() for p in r["bench"]["sweep"]
    }
    for name, r in rows.items():
        profile = json.loads((folder / r["profile"]).read_text())
        shown = by_chart[f"operators:{name}"]
        assert list(shown.values()) == [o["self_ms"] for o in profile["operators"][:8]]
    assert (
        "http://" not in (folder / "report.html").read_text()
        and "https://" not in (folder / "report.html").read_text()
    )


def _text(page):
    """What a reader sees: the page without its script, style and tags."""
    page = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_every_chart_states_its_units(x86_build):
    report, folder = x86_build
    page = (folder / "report.html").read_text()
    assert "latency p50, batch 1 (ms)" in page and "size on disk (MB)" in page
    assert "samples / s" in page and "batch size (samples per run)" in page  # the throughput chart's two axes
    # each operator: its ms and its share of the total
    for name in ["fp32_reference", *(a.name for a in report.artifacts)]:
        profile = json.loads((folder / "profiles" / f"{name}.json").read_text())
        top = profile["operators"][0]
        assert f"{top['self_ms']:.3f} ms · {top['share']:.1%}</text>" in page
    assert "((" not in _text(page) and "))" not in _text(page)


def test_profiles_are_kept_per_artifact_with_shares(x86_build):
    report, folder = x86_build
    tools = {
        "fp32_reference": "torch.profiler",
        "torch_int8": "torch.profiler",
        "onnx_fp32": "onnxruntime profiler",
        "onnx_int8": "onnxruntime profiler",
    }
    for name, tool in tools.items():
        profile = json.loads((folder / "profiles" / f"{name}.json").read_text())
        assert profile["tool"] == tool and profile["runs"] > 0 and profile["total_ms"] > 0
        ops = profile["operators"]
        assert ops and all(a["self_ms"] >= b["self_ms"] for a, b in zip(ops, ops[1:]))
        assert 0 < sum(o["share"] for o in ops) <= 1.001  # each share rounded to 4 places
    names = lambda n: {
        o["name"] for o in json.loads((folder / "profiles" / f"{n}.json").read_text())["operators"]
    }
    assert any(n.startswith("quantized::conv2d") for n in names("torch_int8"))
    assert "QLinearConv" in names("onnx_int8") and "Conv" in names("onnx_fp32")
    ref = json.loads((folder / "profiles" / "fp32_reference.json").read_text())
    assert any(o["input_shapes"] for o in ref["operators"])


def test_bench_numbers_in_report_json(x86_build):
    report, folder = x86_build
    data = json.loads((folder / "report.json").read_text())
    for entry in [data["reference"], *data["artifacts"]]:
        b = entry["bench"]
        assert [p["batch_size"] for p in b["sweep"]] == [1, 8, 32]
        assert (
            entry["latency_ms"] == b["sweep"][0]["p50_ms"]
            and entry["latency_p99_ms"] == b["sweep"][0]["p99_ms"]
        )
        for p in b["sweep"]:
            assert p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
            assert p["throughput"] == pytest.approx(p["batch_size"] * 1000 / p["p50_ms"], rel=1e-3)
        assert b["latency_budget_ms"] == 50.0 and b["threads"] == 2
        # what fits depends on the machine's load;
        fitting = [p for p in b["sweep"] if p["p95_ms"] <= b["latency_budget_ms"]]
        # the choice must follow it
        best = max(fitting, key=lambda p: p["throughput"])["batch_size"] if fitting else None
        assert b["best_batch"] == best


def test_best_batch_is_the_fastest_within_the_budget(monkeypatch):
    import toolchain.measure.timing as bench_module

    # a model that takes exactly 1 ms + 2 ms per sample, on a clock of its own: no timing in the test
    clock = [0]
    monkeypatch.setattr(bench_module.time, "perf_counter_ns", lambda: clock[0])

    def load():
        def run(x):
            clock[0] += 1_000_000 + 2_000_000 * len(x)  # batch 2: 5 ms (400/s); batch 8: 17 ms (471/s)

        return run

    b = bench(load, (1,), (1, 2, 8), warmup=1, runs=5, threads=1, budget_ms=10.0)
    assert [p.batch_size for p in b.sweep] == [1, 2, 8]
    assert b.best_batch == 2  # batch 8 has the best throughput but is over budget
    assert bench(load, (1,), (1, 2), warmup=0, runs=3, threads=1, budget_ms=0.5).best_batch is None


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "toolchain", *args], capture_output=True, text=True, timeout=600
    )


def test_bench_command_prints_percentiles_and_sweep(x86_build):
    _, folder = x86_build
    r = _cli("bench", str(folder), "--runs", "5")
    assert r.returncode == 0, r.stderr
    assert (
        "p50 ms" in r.stdout
        and "p99 ms" in r.stdout
        and "b32 samples/s" in r.stdout
        and "best batch" in r.stdout
    )
    for name in ("fp32_reference", "torch_int8", "onnx_fp32", "onnx_int8"):
        assert re.search(rf"^\| {name} ", r.stdout, re.M), r.stdout
    assert "Warning" not in r.stderr and "deprecat" not in r.stderr.lower(), r.stderr  # libraries keep quiet
    data = json.loads((folder / "bench.json").read_text())
    assert data["settings"]["runs"] == 5 and data["settings"]["threads"] == 2
    recorded = json.loads((folder / "report.json").read_text())["artifacts"][0]["bench"]["sweep_runs"]
    # the profile's, not what a point stopped at
    assert recorded == 3 and data["settings"]["sweep_runs"] == recorded
    assert f"{recorded} at larger batches" in r.stdout.splitlines()[0]
    assert all(r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0 for r in data["results"].values())
    assert set(data["results"]) == {"fp32_reference", "torch_int8", "onnx_fp32", "onnx_int8"}
    r = _cli("bench", str(folder), "--runs", "3", "--budget-ms", "0.000001", "--batch-sizes", "1,4")
    assert r.returncode == 0 and "none fits" in r.stdout and "b4 samples/s" in r.stdout


def test_bench_refuses_a_folder_that_is_not_a_build(tmp_path):
    r = _cli("bench", str(tmp_path))
    assert (
        r.returncode == EXIT_USER_ERROR
        and "is not a build folder" in r.stderr
        and "Traceback" not in r.stderr
    )


def _chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("TOOLCHAIN_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (make test installs Debian's chromium)")
        pytest.skip("chromium is not installed (Debian package `chromium`; `make test` installs it)")
    return found


def headless_chromium(tmp_path: Path) -> list[str]:
    """Chromium's command line, started as the probe of this machine starts it (no network of its own)."""
    return [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=3000",
    ]


def rendered_charts(page: Path, tmp_path: Path) -> dict:
    """What the page's script drew, chart by chart (its `data-rendered` record), in headless Chromium."""
    r = subprocess.run(
        [*headless_chromium(tmp_path), "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'data-rendered="([^"]*)"', r.stdout)
    assert match, r.stderr[-2000:]
    return json.loads(match.group(1).replace("&quot;", '"'))


def test_report_renders_in_headless_chromium(x86_build, tmp_path):
    _, folder = x86_build
    rendered = rendered_charts(folder / "report.html", tmp_path)
    report = json.loads((folder / "report.json").read_text())
    n = 1 + len(report["artifacts"])
    assert rendered["latency"]["marks"] == n and rendered["size"]["marks"] == n
    assert rendered["throughput"]["marks"] == n * 3
    for name in ["fp32_reference", *(a["name"] for a in report["artifacts"])]:
        assert rendered[f"operators:{name}"]["marks"] > 0
    assert all(c["width"] > 100 and c["height"] > 50 for c in rendered.values()), rendered
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            *headless_chromium(tmp_path),
            f"--screenshot={shot}",
            "--window-size=1200,1800",
            (folder / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
    )
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::97]}
    assert len(colours) > 8  # bars in several colours, not a blank page


def test_a_failing_profiler_costs_only_the_profile(digits, tmp_path, monkeypatch):
    import dataclasses

    from toolchain import runtimes

    def fail(*args):
        raise RuntimeError("profiler broke")

    for name in ("torchscript", "onnxruntime"):
        monkeypatch.setitem(
            runtimes.RUNTIMES._items, name, dataclasses.replace(runtimes.get(name), profile=fail)
        )
    report, folder = toolchain.build(
        str(digits["model"]),
        str(fast_profile(tmp_path)),
        tmp_path / "out",
        digits["calibration"],
        digits["validation"],
    )
    assert report.passed and all(a.profile is None for a in report.artifacts)
    # the torch reference profiler still ran
    assert report.reference["profile"] == "profiles/fp32_reference.json"
    page = _marks(folder)
    assert {c for c, *_ in page.marks if c.startswith("operators:")} == {"operators:fp32_reference"}


def test_page_top_shows_warnings_and_recovery_before_the_tables(digits, tmp_path):
    """No --val: a warning; the page shows it beside the verdict, above the parity table."""
    report, folder = toolchain.build(
        str(digits["model"]),
        str(fast_profile(tmp_path, 64, 16, batch_sizes="[1]")),
        tmp_path / "out",
        digits["calibration"],
    )
    page = (folder / "report.html").read_text()
    warning = next(w for w in report.warnings if w.startswith("no --val data"))
    assert page.index("class='warning'") < page.index("<h2>Parity against FP32</h2>")
    assert html.escape(warning) in page[: page.index("<h2>Parity against FP32</h2>")]
    # one batch size: a bar each, not lone dots
    marks = [m for m in _marks(folder).marks if m[0] == "throughput"]
    assert {(label, batch) for _, label, batch, _ in marks} == {
        (n, "1") for n in ["fp32_reference", *(a.name for a in report.artifacts)]
    }
    # units on every chart
    assert "samples / s at batch 1" in page and " ms</text>" in page and " MB</text>" in page
    assert " samples/s</text>" in page


def test_long_operator_names_are_whole_in_labels_and_tooltips():
    from toolchain.reporting.html import _bars, _operators

    name = "Convolution (NHWC, QC8) IGEMM with a long tail"
    svg = _bars("operators:x", "t", [(name, 1.0)], "{:.3f} ms", label_w=210, limit=30)
    assert (
        f"data-label='{name}'" in svg
        and f"<title>{name}</title>" in svg
        and "Convolution (NHWC, QC8) IGEMM…" in svg
    )
    name = "XNNPACK Convolution (NHWC, QC8) IGEMM #3 (fused ReLU) of layer features.12.conv"
    svg = _operators(
        "x",
        {
            "tool": "ExecuTorch ETDump",
            "total_ms": 2.0,
            "operators": [
                {"name": name, "self_ms": 1.5, "share": 0.75},
                {"name": "Add", "self_ms": 0.5, "share": 0.25},
            ],
        },
    )
    label = re.search(r"<text [^>]*text-anchor='end'><title>([^<]*)</title>([^<]*)</text>", svg)
    assert label.group(1) == name and label.group(2).endswith("…") and name.startswith(label.group(2)[:-1])
    assert f"data-label='{name}'" in svg and "1.500 ms · 75.0%" in svg


def test_throughput_chart_for_many_batch_sizes_and_for_one():
    from toolchain.reporting.html import _throughput

    def series(*values, sizes=(1, 8, 32)):
        return [{"batch_size": b, "throughput": v, "p50_ms": b * 1000 / v} for b, v in zip(sizes, values)]

    # equal to onnx_fp32: both must stay visible
    lines = [
        ("fp32_reference", series(20.0, 150.0, 600.0)),
        ("onnx_fp32", series(40000.0, 120000.0, 140000.0)),
        ("onnx_int8", series(40000.0, 120000.0, 140000.0)),
    ]
    svg = _throughput(lines)
    marks = re.findall(
        r"<path class='point' data-chart='throughput' data-label='([^']*)' data-batch='(\d+)' "
        r"data-value='([^']*)'",
        svg,
    )
    assert {(n, int(b), float(v)) for n, b, v in marks} == {
        (n, p["batch_size"], p["throughput"]) for n, pts in lines for p in pts
    }
    lines_points = re.findall(r"<polyline [^>]*points='([^']*)'", svg)
    assert lines_points[1] != lines_points[2]  # equal values set apart, not drawn over each other
    # a marker shape each
    assert (
        len({re.sub(r"[\d.,-]", "", d) for d in re.findall(r"<path class='point'[^>]* d='([^']*)'", svg)})
        == 3
    )
    # 20 to 140,000 samples/s: a linear axis would flatten the slow line
    assert "samples / s (log scale)" in svg
    single = _throughput([(n, pts[:1]) for n, pts in lines])
    bars = re.findall(
        r"<rect class='bar' data-chart='throughput' data-batch='1' data-label='([^']*)' data-value='([^']*)'",
        single,
    )
    assert [(n, float(v)) for n, v in bars] == [(n, pts[0]["throughput"]) for n, pts in lines]
    assert "samples / s at batch 1" in single and "40,000.0 samples/s</text>" in single


def test_model_line_has_no_doubled_parentheses():
    from toolchain.reporting.html import _model_line

    report = {
        "model": {
            "source": "torchvision:resnet18",
            "input_shape": [1, 3, 224, 224],
            "weights": (
                "random, seed 0 (torchvision weights cannot be downloaded here; "
                "parity is not evidence of accuracy)"
            ),
        },
        "primary": None,
        "build_seconds": 3.0,
    }
    line = _model_line(report)
    assert "weights: random, seed 0 (torchvision" in line and "))" not in line and "((" not in line


def test_peak_memory_is_what_the_model_adds_not_the_runtime():
    """A runtime that keeps 48 MB once per process (its library, its caches) and a model of 16 MB:
    the bench reports the model's 16 MB, even for the first model a process loads."""
    library = []

    def load():
        if not library:
            library.append(np.ones(6 * 2**20))  # 48 MB, touched: resident
        weights = np.ones(2 * 2**20)  # 16 MB
        return lambda x: weights.sum()

    b = bench(load, (4,), (1, 2), warmup=0, runs=3, threads=1, budget_ms=None)
    if b.peak_memory_bytes is None:
        pytest.skip("this system does not report a resident high-water mark (/proc/self/clear_refs)")
    assert 15 * 2**20 <= b.peak_memory_bytes < 48 * 2**20  # 16 MB, less a page or two of rounding
