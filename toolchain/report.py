"""`report.json`, `report.md` and the terminal table: one summary, three renderings.

The keys of `report.json` are a contract that users' scripts and the nightly parity job
read: extend, never rename.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .bench import Bench
from .parity import Parity


@dataclasses.dataclass(frozen=True)
class ArtifactReport:
    name: str
    path: str  # relative to the build folder
    format: str
    runtime: str
    precision: str
    engine: str | None
    size_bytes: int
    sha256: str
    bench: Bench  # latency percentiles at batch 1, the batch sweep, peak memory
    parity: Parity
    primary: bool = False
    eligible: bool = True  # the profile lets it be primary
    stage_facts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # e.g. mobile passes not applied
    profile: str | None = None  # profiles/<name>.json, relative to the build folder

    @property
    def latency_ms(self) -> float:
        return self.bench.batch1.p50_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": self.path, "format": self.format, "runtime": self.runtime,
            "precision": self.precision, "engine": self.engine, "size_bytes": self.size_bytes,
            "sha256": self.sha256, "primary": self.primary,
            "latency_ms": self.bench.batch1.p50_ms, "latency_p95_ms": self.bench.batch1.p95_ms,
            "latency_p99_ms": self.bench.batch1.p99_ms,
            "parity": _parity_json(self.parity), "stage_facts": self.stage_facts,
            "bench": self.bench.to_json(), "profile": self.profile,
        }


@dataclasses.dataclass(frozen=True)
class Report:
    target: str
    target_file: str
    model: dict[str, Any]
    reference: dict[str, Any]  # FP32: format, size_bytes, latency_ms, accuracy
    data: dict[str, Any]
    artifacts: tuple[ArtifactReport, ...]
    skipped: tuple[dict[str, Any], ...]
    thresholds: Any  # the ParityThresholds applied
    engine: dict[str, Any] | None  # TensorRT engine status, for NVIDIA targets
    warnings: tuple[str, ...]
    build_seconds: float

    @property
    def passed(self) -> bool:
        return bool(self.artifacts) and all(a.parity.passed is not False for a in self.artifacts)

    @property
    def verdict(self) -> str:
        if not self.passed:
            return "FAILED parity"
        return "PASSED" if self.thresholds else "BUILT, parity not judged (random weights)"

    @property
    def primary(self) -> ArtifactReport | None:
        return next((a for a in self.artifacts if a.primary), None)

    def to_json(self) -> dict[str, Any]:
        return _finite({
            "target": self.target, "target_file": self.target_file, "passed": self.passed, "verdict": self.verdict,
            "primary": self.primary.name if self.primary else None,
            "parity_inputs": "synthetic" if self.data["validation"]["synthetic"] else "data",
            "model": self.model, "reference": self.reference, "data": self.data,
            "artifacts": [a.to_json() for a in self.artifacts],
            "parity_judged": self.thresholds is not None,
            "parity_thresholds": dataclasses.asdict(self.thresholds) if self.thresholds else None,
            "engine": self.engine,
            "skipped": list(self.skipped), "warnings": list(self.warnings),
            "build_seconds": self.build_seconds,
        })


def mark_primary(artifacts: list[ArtifactReport]) -> list[ArtifactReport]:
    """The fastest eligible artifact that does not fail parity becomes primary (none if all fail)."""
    passing = [a for a in artifacts if a.parity.passed is not False and a.eligible]
    best = min(passing, key=lambda a: a.latency_ms, default=None)
    return [dataclasses.replace(a, primary=a is best) for a in artifacts]


def write(report: Report, folder: Path) -> None:
    """`report.json`, `report.md` and `report.html` (drawn from the same dictionary as the JSON)."""
    from .html import write_html

    data = report.to_json()
    (folder / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    write_html(folder, data)


def markdown(report: Report) -> str:
    lines = [
        f"# {report.model['name']} → {report.target}: {report.verdict}",
        "",
        f"Model `{report.model['source']}` (weights: {report.model['weights']}), "
        f"input {'x'.join(map(str, report.model['input_shape']))}; "
        f"parity on {report.data['validation']['samples']} {report.data['validation']['origin']} inputs.",
        "",
        table(report),
        "",
    ]
    if report.engine:
        lines += [f"- TensorRT engine: {report.engine['status']} ({report.engine['reason']})"]
    for a in report.artifacts:
        lines += [f"- `{a.name}` {stage}: {facts_line(facts)}" for stage, facts in a.stage_facts.items()]
    lines += [f"- skipped `{s['name']}`: {s['reason']}" for s in report.skipped]
    lines += [f"- warning: {w}" for w in report.warnings]
    return "\n".join(lines).rstrip() + "\n"


def table(report: Report) -> str:
    head = ["artifact", "precision", "size", "latency (ms)", "SQNR (dB)", "cosine", "top-1 agr.", "accuracy", "parity"]
    ref = report.reference
    rows = [["fp32 reference", "fp32", _mb(ref["size_bytes"]), f"{ref['latency_ms']:.2f}", "", "", "", _pct(ref["accuracy"]), ""]]
    for a in report.artifacts:
        p = a.parity
        rows.append([
            a.name + (" *" if a.primary else ""), a.precision, _mb(a.size_bytes), f"{a.latency_ms:.2f}",
            f"{p.sqnr_db:.1f}", f"{p.cosine:.4f}", _pct(p.top1_agreement), _pct(p.accuracy),
            parity_verdict(p.passed, p.failures),
        ])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def parity_verdict(passed: bool | None, failures) -> str:
    return {True: "pass", None: "not judged"}.get(passed) or "FAIL: " + "; ".join(failures)


def facts_line(facts: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, dict):
            return "; ".join(f"{k} ({w})" if isinstance(w, str) else f"{k} ×{w}" for k, w in v.items()) or "none"
        if isinstance(v, (list, tuple)):
            return ", ".join(map(str, v)) or "none"
        return str(v)

    return "; ".join(f"{k.replace('_', ' ')}: {one(v)}" for k, v in facts.items())


def _parity_json(p: Parity) -> dict[str, Any]:
    return {
        "sqnr_db": p.sqnr_db, "cosine": p.cosine, "max_abs": p.max_abs, "mean_abs": p.mean_abs,
        "top1_agreement": p.top1_agreement, "accuracy": p.accuracy, "passed": p.passed,
        "failures": list(p.failures), "samples": p.samples,
    }


def _finite(value: Any) -> Any:
    """JSON has no infinity: an infinite SQNR (bit-identical outputs) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.2%}"
