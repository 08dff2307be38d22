"""`toolchain bench BUILD_DIR`: every artifact of a build folder (and the FP32 model) re-timed, alone,
with the settings its report.json records unless given. It measures with the same function a build
does (:func:`toolchain.measure.timing.bench`), so the two report the same quantities the same way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from toolchain import runtimes
from toolchain.core.artifact import Artifact
from toolchain.core.errors import ToolchainError
from toolchain.core.heap import keeps_heap_frozen
from toolchain.core.native import keeps_torch_settings
from toolchain.core.runner import reference_runner
from toolchain.inputs.prepare import bind_constants, recorded_model, recorded_signature
from toolchain.measure.timing import bench
from toolchain.runtimes import load_runner

log = logging.getLogger("toolchain")


@keeps_torch_settings
@keeps_heap_frozen
def bench_build(
    folder: Path,
    batch_sizes: tuple[int, ...] | None = None,
    runs: int | None = None,
    threads: int | None = None,
    budget_ms: float | None = None,
    sweep_runs: int | None = None,
) -> dict[str, Any]:
    """Re-measure every artifact of a build folder (and the FP32 model, when its source can
    still be loaded) with the settings recorded in its report.json unless given here."""
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise ToolchainError(f"`{folder}` is not a build folder (no report.json)")
    try:
        report = json.loads(report_path.read_text())
        artifacts = report["artifacts"]
        recorded = (artifacts[0] if artifacts else report["reference"])["bench"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
        raise ToolchainError(f"{report_path}: not a report this toolchain version wrote ({e})") from None
    sizes = batch_sizes or tuple(p["batch_size"] for p in recorded["sweep"])
    threads = threads or recorded["threads"]
    runs = runs or recorded["sweep"][0]["runs"]
    sweep_runs = (
        sweep_runs
        or recorded.get("sweep_runs")
        or max(p["runs"] for p in recorded["sweep"][1:] or recorded["sweep"])
    )
    budget = budget_ms if budget_ms is not None else recorded["latency_budget_ms"]
    sample = recorded_signature(report["model"])
    settings = dict(
        batch_sizes=tuple(sizes),
        warmup=recorded["warmup_runs"],
        runs=runs,
        sweep_runs=sweep_runs,
        threads=threads,
        budget_ms=budget,
    )

    results = {}
    for a in artifacts:
        artifact = artifact_of(folder, a)
        if not artifact.path.is_file():
            raise ToolchainError(f"{folder}: artifact file `{a['path']}` is missing")
        log.info("timing %s", a["name"])
        own = {**settings, "batch_sizes": artifact.timed_batches(settings["batch_sizes"])}
        b = bench(lambda: load_runner(artifact, a["runtime"], threads), sample, **own)
        results[a["name"]] = {
            "runtime": a["runtime"],
            "engine": a["engine"],
            "size_bytes": artifact.size_bytes(),
            "files": [p.name for p in artifact.files()],
            **b.to_json(),
        }
    note = None
    try:
        # loaded inside the bench, so its weights count in its memory, as an artifact's do
        def reference():
            loaded = recorded_model(report["model"], None, None)
            return reference_runner(bind_constants(loaded, sample.synthetic(2)).artifact, threads)

        b = bench(reference, sample, **settings)
        results = {
            "fp32_reference": {
                "runtime": "torch eager",
                "engine": None,
                "size_bytes": report["reference"]["size_bytes"],
                "files": [],
                **b.to_json(),
            },
            **results,
        }
    except ToolchainError as e:
        note = f"FP32 reference not measured: {e}"
    return {
        "build": str(folder),
        "target": report["target"],
        "input_shape": report["model"]["input_shape"],
        "settings": {**settings, "batch_sizes": list(settings["batch_sizes"])},
        "results": results,
        "note": note,
    }


def artifact_of(folder: Path, entry: dict[str, Any]) -> Artifact:
    """The artifact a report.json entry names in ``folder``, to load as the build checked it (its
    quantized engine and, where they differ from it, the kernels: measure.cpu.torch_kernels)."""
    kernels = entry.get("stage_facts", {}).get("quantize_torch", {}).get("kernels")
    return Artifact(
        runtimes.get(entry["runtime"]).kind,
        entry["precision"],
        path=folder / entry["path"],
        quantized_engine=entry["engine"],
        kernels=kernels if kernels != entry["engine"] else None,
    )


def _memory_mb(n: int | None) -> str:
    """Resident memory the model added; under 0.1 MB is said as such, not as 0.0."""
    return "n/a" if n is None else (f"{n / 2**20:.1f}" if n >= 2**20 / 10 else "<0.1")


def bench_table(data: dict[str, Any]) -> str:
    sizes = data["settings"]["batch_sizes"]
    head = [
        "model",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        *[f"b{b} samples/s" for b in sizes],
        "best batch",
        "peak MB",
        "size MB",
    ]
    rows = []
    for name, r in data["results"].items():
        one = r["sweep"][0]
        thr = {p["batch_size"]: p["throughput"] for p in r["sweep"]}
        rows.append(
            [
                name,
                f"{one['p50_ms']:.3f}",
                f"{one['p95_ms']:.3f}",
                f"{one['p99_ms']:.3f}",
                *[f"{thr[b]:,.1f}" if b in thr else "" for b in sizes],
                str(r["best_batch"] or "none fits"),
                _memory_mb(r["peak_memory_bytes"]),
                f"{r['size_bytes'] / 2**20:.2f}" if r["size_bytes"] else "",
            ]
        )
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: (
        "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    )
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])
