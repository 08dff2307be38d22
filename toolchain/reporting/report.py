"""`report.json`, `report.md` and the terminal table: one summary, three renderings.

The keys of `report.json` are a contract that users' scripts and the nightly parity job
read: extend, never rename.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from toolchain.core.jsonable import finite
from toolchain.measure.timing import Bench
from toolchain.reporting.html import write_html
from toolchain.reporting.words import (
    facts_line,
    metric_line,
    near_ties_line,
    output_label,
    parity_verdict,
    subset_line,
)
from toolchain.verdict.parity import Parity

NOT_JUDGED = "NOT JUDGED (random weights)"


@dataclasses.dataclass(frozen=True)
class ArtifactReport:
    name: str
    path: str  # relative to the build folder
    format: str
    runtime: str
    precision: str
    # torch INT8: the quantized engine its weights are packed for (JSON: `engine`)
    quantized_engine: str | None
    size_bytes: int
    sha256: str
    bench: Bench  # latency percentiles at batch 1, the batch sweep, peak memory
    parity: Parity
    primary: bool = False
    eligible: bool = True  # the profile lets it be primary
    required: bool = True  # the profile says it must pass for the build to pass
    # e.g. mobile passes not applied
    stage_facts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    profile: str | None = None  # profiles/<name>.json, relative to the build folder
    recovery: dict[str, Any] | None = None  # what recovery did when the first build missed parity
    float_layers: tuple[str, ...] = ()  # layers kept in floating point (precision "mixed")
    # why its timed latency is not to be trusted (measure.timing.busy_cores)
    latency_warning: str | None = None
    # the share of its multiply-accumulates that run in INT8 (toolchain.verdict.share); None: not measured
    int8_share: float | None = None
    int8_share_basis: str | None = None
    # an FP16 artifact's share of multiply-accumulates in FP16 (the rest kept in FP32); None: all FP16
    # as far as anything counts, or not FP16
    fp16_share: float | None = None
    int4_share: float | None = None  # multiply-accumulates with 4-bit weights (int4 artifacts)
    vs_int8: dict[str, Any] | None = None  # a 4-bit artifact's size and latency over the build's INT8 one
    # where its activation ranges come from: "calibration", "qat" (a fine-tuned QAT state), "dynamic"
    # (computed per batch at run time); None for float artifacts
    ranges: str | None = None

    @property
    def latency_ms(self) -> float:
        return self.bench.batch1.p50_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "format": self.format,
            "runtime": self.runtime,
            "precision": self.precision,
            "engine": self.quantized_engine,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "primary": self.primary,
            "required": self.required,
            "eligible": self.eligible,  # may be primary (the profile's `primary = false` says not)
            "latency_ms": self.bench.batch1.p50_ms,
            "latency_p95_ms": self.bench.batch1.p95_ms,
            "latency_p99_ms": self.bench.batch1.p99_ms,
            "parity": _parity_json(self.parity),
            "stage_facts": self.stage_facts,
            "bench": self.bench.to_json(),
            "profile": self.profile,
            "float_layers": list(self.float_layers),
            "recovery": self.recovery,
            "latency_warning": self.latency_warning,
            "int8_share": self.int8_share,
            "int8_share_basis": self.int8_share_basis,
            "fp16_share": self.fp16_share,
            "int4_share": self.int4_share,
            "vs_int8": self.vs_int8,
            "ranges": self.ranges,
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
    cpu: dict[str, Any] | None = None  # host CPU, target instruction set, whether host parity is a proxy
    metric: dict[str, Any] | None = None  # the user's metric: name, FP32 score, tolerance
    # artifacts for another kind of model (dynamic INT8 for a CNN)
    not_applicable: tuple[dict[str, Any], ...] = ()
    # how the primary was chosen: the leaders timed alternating, ties, margin (toolchain.primary)
    primary_choice: dict[str, Any] | None = None
    qat: dict[str, Any] | None = None  # the QAT state the build was given (`--qat`): file, sha256, artifact

    @property
    def passed(self) -> bool | None:
        """False when any required artifact fails (any artifact, when none built is required); None
        when nothing was judged (random weights); else True."""
        judged = [a for a in self.artifacts if a.required] or self.artifacts
        if not judged or any(a.parity.passed is False for a in judged):
            return False
        return None if self.thresholds is None else True

    @property
    def optional_failures(self) -> list[str]:
        """Warnings for the optional artifacts that failed while the build's verdict rests on others."""
        if not any(a.required for a in self.artifacts):
            return []
        return [
            f"optional artifact {a.name} failed parity ({'; '.join(a.parity.failures)[:200]}); "
            "the build's verdict rests on the required artifacts"
            for a in self.artifacts
            if not a.required and a.parity.passed is False
        ]

    @property
    def verdict(self) -> str:
        return {True: "PASSED", False: "FAILED parity", None: NOT_JUDGED}[self.passed]

    @property
    def primary(self) -> ArtifactReport | None:
        return next((a for a in self.artifacts if a.primary), None)

    def to_json(self) -> dict[str, Any]:
        return finite(
            {
                "target": self.target,
                "target_file": self.target_file,
                "passed": self.passed,
                "verdict": self.verdict,
                "primary": self.primary.name if self.primary else None,
                "primary_choice": self.primary_choice,
                "parity_inputs": _parity_inputs(self.data),
                "model": self.model,
                "reference": self.reference,
                "data": self.data,
                "artifacts": [a.to_json() for a in self.artifacts],
                "parity_judged": self.thresholds is not None,
                "parity_thresholds": dataclasses.asdict(self.thresholds) if self.thresholds else None,
                "engine": self.engine,
                "metric": self.metric,
                "qat": self.qat,
                "cpu": self.cpu,
                "parity_proxy": bool(self.cpu and self.cpu["proxy"]),
                "skipped": list(self.skipped),
                "not_applicable": list(self.not_applicable),
                "warnings": list(self.warnings),
                "build_seconds": self.build_seconds,
            }
        )


def mark_primary(artifacts: list[ArtifactReport]) -> list[ArtifactReport]:
    """The fastest eligible artifact that does not fail parity becomes primary (none if all fail)."""
    passing = [a for a in artifacts if a.parity.passed is not False and a.eligible]
    best = min(passing, key=lambda a: a.latency_ms, default=None)
    return [dataclasses.replace(a, primary=a is best) for a in artifacts]


def write(report: Report, folder: Path) -> None:
    """`report.json`, `report.md` and `report.html` (drawn from the same dictionary as the JSON)."""

    data = report.to_json()
    (folder / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    write_html(folder, data)


def markdown(report: Report) -> str:
    lines = [
        f"# {report.model['name']} → {report.target}: {report.verdict}",
        "",
        f"Model `{report.model['source']}` (weights: {report.model['weights']}), "
        f"{inputs_phrase(report.model)}; parity on {report.data['validation']['samples']} "
        f"{report.data['validation']['origin']} inputs.",
        "",
        table(report),
        "",
    ]
    if report.engine:
        lines += [f"- TensorRT engine: {report.engine['status']} ({report.engine['reason']})"]
    lines += [f"- {line}" for line in metric_lines(report)]
    lines += [f"- {line}" for line in subset_lines(report)]
    lines += [f"- recovery: {line}" for line in recovery_lines(report)]
    lines += [f"- {line}" for line in near_ties_lines(report)]
    lines += [f"- {line}" for line in primary_lines(report)]
    lines += [f"- {line}" for line in int4_lines(report)]
    for a in report.artifacts:
        lines += [f"- `{a.name}` {stage}: {facts_line(facts)}" for stage, facts in a.stage_facts.items()]
    lines += [f"- skipped `{s['name']}`: {s['reason']}" for s in report.skipped]
    lines += [f"- not applicable `{s['name']}`: {s['reason']}" for s in report.not_applicable]
    lines += [f"- warning: {w}" for w in report.warnings]
    return "\n".join(lines).rstrip() + "\n"


def inputs_phrase(model: dict) -> str:
    """`input 1x1x8x8`, or every input by name (`inputs ids 1x16 int64, mask 1x16 int64`), and the
    fixed arguments."""
    inputs = model.get("inputs") or []
    if len(inputs) > 1 or any(i["dtype"] != "float32" for i in inputs):
        text = "inputs " + ", ".join(
            f"{i['name']} {'x'.join(map(str, i['shape'])) or 'scalar'} {i['dtype']}" for i in inputs
        )
    else:
        text = f"input {'x'.join(map(str, model['input_shape']))}"
    fixed = [f"{c['name']} = {c['value']} ({c['source']})" for c in model.get("constants", [])]
    return text + (f"; fixed in every artifact: {', '.join(fixed)}" if fixed else "")


def _top1(p) -> float | None:
    """The table's top-1 column: the judged one, else a single output's reported one (a regression's)."""
    if p.top1_agreement is None and len(p.outputs) == 1:
        return p.outputs[0].top1_agreement
    return p.top1_agreement


def _precision_cell(a: ArtifactReport) -> str:
    """`int8 (0.2 % INT8)`: an INT8 artifact whose multiply-accumulates are not all INT8 says how many are."""
    if a.int4_share is not None and (a.precision == "int4" or a.int4_share < 1):
        return a.precision if a.int4_share >= 1 else f"mixed ({a.int4_share:.1%} INT4)"
    partial = a.int8_share is not None and a.int8_share < 1 and a.precision in ("int8", "mixed")
    if partial:
        return f"{a.precision} ({a.int8_share:.1%} INT8)"
    if a.fp16_share is not None and a.fp16_share < 1 and a.precision == "fp16":
        return f"fp16 ({a.fp16_share:.1%} FP16)"
    npu = a.stage_facts.get("compile_qnn", {})
    if npu.get("offload") == "partial":  # the nodes the HTP refuses run on the phone's CPU
        return f"{a.precision} (HTP {npu['htp_nodes']}/{npu['htp_nodes'] + npu['cpu_nodes']} nodes)"
    return a.precision


def table(report: Report) -> str:
    head = [
        "artifact",
        "precision",
        "size",
        "latency (ms)",
        "SQNR (dB)",
        "cosine",
        "top-1 agr.",
        "accuracy",
        "parity",
    ]
    ref = report.reference
    rows = [
        [
            "fp32 reference",
            "fp32",
            _mb(ref["size_bytes"]),
            f"{ref['latency_ms']:.2f}",
            "",
            "",
            "",
            _pct(ref["accuracy"]),
            "",
        ]
    ]
    for a in report.artifacts:
        p = a.parity
        rows.append(
            [
                a.name + (" *" if a.primary else ""),
                _precision_cell(a),
                _mb(a.size_bytes),
                _latency_cell(a),
                f"{p.sqnr_db:.1f}",
                f"{p.cosine:.4f}",
                _pct(_top1(p)),
                _pct(p.accuracy),
                parity_verdict(p.passed, p.failures),
            ]
        )
        if len(p.outputs) > 1:  # each output on its own line under the artifact's worst case
            rows += [
                [
                    f"  output {output_label(o)}",
                    "",
                    "",
                    "",
                    f"{o.sqnr_db:.1f}",
                    f"{o.cosine:.4f}",
                    _pct(o.top1_agreement),
                    _pct(o.accuracy),
                    parity_verdict(o.passed, o.failures),
                ]
                for o in p.outputs
            ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])


def _latency_cell(a: ArtifactReport) -> str:
    from toolchain import runtimes

    emulated = a.runtime in runtimes.names() and runtimes.get(a.runtime).emulated
    return f"{a.latency_ms:.2f}" + (" (host emulation)" if emulated else "")


def metric_lines(report: Report) -> list[str]:
    """The user's metric in one line (:func:`words.metric_line`); none without a metric."""
    if not report.metric:
        return []
    return [metric_line(report.metric, [(a.name, a.parity.metric or {}) for a in report.artifacts])]


def subset_lines(report: Report) -> list[str]:
    """The artifacts checked on part of the validation inputs (``artifacts.NAME.parity_samples``)."""
    total = report.data["validation"]["samples"]
    return [line for a in report.artifacts if (line := subset_line(a.name, a.parity.samples, total))]


def recovery_lines(report: Report) -> list[str]:
    """One line per artifact that recovery worked on: what it did, or why it could not."""
    return [a.recovery["summary"] for a in report.artifacts if a.recovery]


def primary_lines(report: Report) -> list[str]:
    """How the primary was chosen, when it was raced against others (toolchain.primary)."""
    c = report.primary_choice
    if not c:
        return []
    if not c["candidates"]:
        lines = [f"primary: {c['primary']} ({c['rule']})"]
    else:
        timed = ", ".join(f"{x['name']} {x['median_ms']:.3f} ms" for x in c["candidates"])
        margin = f", runner-up x{c['margin']:.2f}" if c.get("margin") else ""
        lines = [f"primary: {c['primary']} ({c['rule']}; timed in turn at batch 1: {timed}{margin})"]
    t = c.get("threads_choice")
    if t and t.get("candidates"):
        timed = ", ".join(
            f"{x['threads']} thread{'s' if x['threads'] != 1 else ''} {x['median_ms']:.3f} ms"
            for x in t["candidates"]
        )
        lines.append(
            f"primary's threads: {t['threads']} ({t['rule']}; {c['primary']} timed in turn on "
            f"each count: {timed})"
        )
    elif t:
        lines.append(f"primary's threads: {c['threads']} ({t['rule']})")
    return lines


# the stages that give an artifact 4-bit weights (their facts: int4_share, int8_layers)
FOUR_BIT_STAGES = ("quantize_int4", "quantize_onnx_int4", "compile_qnn_int4")


def beside_int8(artifacts: list[ArtifactReport]) -> list[ArtifactReport]:
    """Each 4-bit artifact with its size and batch-1 latency over those of the build's INT8 artifact in
    the same runtime (``onnx_int4`` beside ``onnx_int8``, ``pte_int4`` beside ``pte_int8``): what its
    4 bits bought. Unchanged where the build has no such INT8 artifact."""
    four_bit = {a.name for a in artifacts if a.stage_facts.keys() & set(FOUR_BIT_STAGES)}
    out = []
    for a in artifacts:
        if a.name in four_bit:
            same = [b for b in artifacts if b.runtime == a.runtime and b.name not in four_bit]
            same = [b for b in same if b.precision in ("int8", "mixed") and b.int8_share != 0]
            b = next((b for b in same if b.name == a.name.replace("int4", "int8")), same[0] if same else None)
            if b is not None:
                a = dataclasses.replace(
                    a,
                    vs_int8={
                        "artifact": b.name,
                        "size_ratio": round(a.size_bytes / b.size_bytes, 3),
                        "latency_ratio": round(a.latency_ms / b.latency_ms, 3),
                    },
                )
        out.append(a)
    return out


def int4_lines(report: Report) -> list[str]:
    """`onnx_int4: 0.62x the size of onnx_int8, batch-1 latency x1.05`: each 4-bit artifact beside INT8."""
    return [
        f"{a.name}: {a.vs_int8['size_ratio']:.2f}x the size of {a.vs_int8['artifact']}, "
        f"batch-1 latency x{a.vs_int8['latency_ratio']:.2f}"
        for a in report.artifacts
        if a.vs_int8
    ]


def qat_lines(report: Report) -> list[str]:
    """`torch_int8: weights and ranges from QAT state qat.pt (not calibrated)` (a warning says when none
    took them)."""
    if report.qat is None:
        return []
    took = [a.name for a in report.artifacts if a.ranges == "qat"]
    return [f"{n}: weights and ranges from QAT state {report.qat['file']} (not calibrated)" for n in took]


def near_ties_lines(report: Report) -> list[str]:
    """Per output whose top-1 agreement missed its bar: how close FP32's top two were, against the
    artifact's error."""
    return [
        near_ties_line(
            a.name,
            output_label(o) if len(a.parity.outputs) > 1 else None,
            o.top1_agreement,
            dataclasses.asdict(o.near_ties),
        )
        for a in report.artifacts
        for o in a.parity.outputs
        if o.near_ties is not None
    ]


def sensitivity_top(report: Report, folder: Path, count: int = 5) -> list[str]:
    """The most sensitive layers of each artifact recovery measured, for the terminal."""
    out = []
    for a in report.artifacts:
        path = a.recovery and a.recovery.get("sensitivity")
        if path:
            rows = json.loads((folder / path).read_text())["layers"][:count]
            out.append(
                f"{a.name}: most sensitive layers (one kept in float): "
                + ", ".join(f"{r['layer']} ({_delta(r)})" for r in rows)
            )
    return out


def _delta(row: dict[str, Any]) -> str:
    gain = row.get("sqnr_gain_db")
    top1 = row.get("top1_agreement")
    parts = [] if gain in (None, "nan") else [f"SQNR {gain:+.1f} dB"]
    parts += [] if top1 is None else [f"top-1 {top1:.1%}"]
    return ", ".join(parts) or "n/a"


def _parity_inputs(data: dict[str, Any]) -> str:
    """synthetic; data (held-out samples); or calibration (parity on calibration samples themselves)."""
    if data["validation"]["synthetic"]:
        return "synthetic"
    return "calibration" if data.get("overlap_samples", 0) >= data["validation"]["samples"] else "data"


def _parity_json(p: Parity) -> dict[str, Any]:
    return {
        "sqnr_db": p.sqnr_db,
        "cosine": p.cosine,
        "max_abs": p.max_abs,
        "mean_abs": p.mean_abs,
        "top1_agreement": p.top1_agreement,
        "accuracy": p.accuracy,
        "passed": p.passed,
        "failures": list(p.failures),
        "samples": p.samples,
        "metric": p.metric,
        "outputs": [{**dataclasses.asdict(o), "shape": list(o.shape)} for o in p.outputs],
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.2%}"
