"""Latency percentiles, a batch-size sweep and peak memory for one runnable model.

The same function measures inside ``toolchain build`` and in ``toolchain bench BUILD_DIR``,
so the two report the same quantities the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .runtime import keeps_torch_settings

log = logging.getLogger("toolchain")


@dataclasses.dataclass(frozen=True)
class BatchPoint:
    batch_size: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # samples per second, at the median latency
    runs: int


@dataclasses.dataclass(frozen=True)
class Bench:
    threads: int
    warmup_runs: int
    sweep: tuple[BatchPoint, ...]
    best_batch: int | None  # best throughput with p95 within the latency budget (None: nothing fits)
    latency_budget_ms: float | None
    peak_memory_bytes: int | None  # resident memory the model adds, loading and running up to the largest batch
    sweep_runs: int | None = None  # timed runs asked for at each batch size above 1 (a point may stop early)

    @property
    def batch1(self) -> BatchPoint:
        return self.sweep[0]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def percentiles(times_ms: np.ndarray) -> tuple[float, float, float]:
    p50, p95, p99 = np.percentile(times_ms, [50, 95, 99])
    return round(float(p50), 4), round(float(p95), 4), round(float(p99), 4)


SWEEP_SECONDS = 2.0  # a larger batch stops after this much timed work, once it has 3 runs


def time_runs(runner: Callable[[np.ndarray], Any], x: np.ndarray, warmup: int, runs: int,
              max_seconds: float | None = None) -> np.ndarray:
    for _ in range(warmup):
        runner(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        runner(x)
        times.append((time.perf_counter_ns() - start) / 1e6)
        if max_seconds is not None and len(times) >= 3 and sum(times) > max_seconds * 1000:
            break
    return np.array(times)


def time_alternating(runners: dict[str, Callable[[Any], Any]], x, rounds: int, warmup: int = 20) -> dict[str, float]:
    """Median milliseconds of each runner on ``x``, the runners timed in turn, ``rounds`` times
    (after ``warmup`` runs each): a slow moment of the machine hits all of them, so their ratios
    hold where their absolute figures would not (benchmarks compare variants this way)."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            start = time.perf_counter_ns()
            run(x)
            times[label].append((time.perf_counter_ns() - start) / 1e6)
    return {label: float(np.median(v)) for label, v in times.items()}


def bench(load: Callable[[], Callable[[np.ndarray], Any]], inputs: "Signature | tuple[int, ...]", batch_sizes: tuple[int, ...],
          warmup: int, runs: int, threads: int, budget_ms: float | None, sweep_runs: int | None = None, seed: int = 0) -> Bench:
    """Load with ``load()``, then time every batch size.

    Inputs are random normal of the model's input shape (``inputs``: a one-input model's sample
    shape, or its :class:`Signature`; integer inputs uniform in [0, 2)): latency does not depend on values.
    Batch 1 is always measured first, with ``runs`` timed runs after ``warmup``; larger
    batches follow in increasing order with ``sweep_runs`` (default ``runs``) after at most
    two warm-up runs, stopping early (never below 3 runs) after SWEEP_SECONDS of timed work:
    a batch of 32 costs 32 times as much. Each point records how many runs it got.

    Peak memory is what the model adds, not what its runtime costs once per process: a first
    load, run once at batch 1 and thrown away, pays for importing the runtime's library, its
    thread pools and kernel caches; then the model is loaded again and measured
    from there (see `_reset_peak`).
    """
    from .feed import InputSpec, Signature

    signature = inputs if isinstance(inputs, Signature) else Signature((InputSpec("input", tuple(inputs)),))
    sizes = sorted({1, *batch_sizes})
    inputs = {b: signature.synthetic(b, seed + b) for b in sizes}
    first = load()  # thrown away: what a runtime does once per process is not the model's memory
    first(inputs[1])  # batch 1 is enough to start its thread pools and caches; larger batches would only cost time
    del first
    baseline = _reset_peak()
    runner = load()
    points = [_time_batch(runner, inputs[b], warmup, runs, sweep_runs) for b in sizes]
    peak = _peak_since(baseline)
    fitting = [p for p in points if p.batch_size in batch_sizes and (budget_ms is None or p.p95_ms <= budget_ms)]
    best = max(fitting, key=lambda p: p.throughput).batch_size if fitting else None
    return Bench(threads, warmup, tuple(points), best, budget_ms, peak, sweep_runs or runs)


def _time_batch(runner: Callable[[np.ndarray], Any], x: np.ndarray, warmup: int, runs: int, sweep_runs: int | None) -> BatchPoint:
    b = len(x)
    if b == 1:
        times = time_runs(runner, x, warmup, runs)
    else:
        times = time_runs(runner, x, min(warmup, 2), sweep_runs or runs, SWEEP_SECONDS)
    p50, p95, p99 = percentiles(times)
    return BatchPoint(b, p50, p95, p99, round(b * 1000.0 / p50, 2) if p50 > 0 else float("inf"), len(times))


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> int | None:
    """Reset the kernel's resident high-water mark (Linux ≥ 4.0); returns the current RSS.

    Garbage is collected and the C heap's free pages handed back to the system first (glibc's
    malloc_trim), so that what is allocated next shows as new resident pages instead of reusing
    pages an earlier model freed (which made a model appear to cost nothing)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed pages may be reused, the count runs low
        ctypes.CDLL(None).malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status("VmRSS")


def _peak_since(baseline: int | None) -> int | None:
    peak = _status("VmHWM")
    return None if baseline is None or peak is None else max(0, peak - baseline)


@keeps_torch_settings
def bench_build(folder: Path, batch_sizes: tuple[int, ...] | None = None, runs: int | None = None,
                threads: int | None = None, budget_ms: float | None = None, sweep_runs: int | None = None) -> dict[str, Any]:
    """Re-measure every artifact of a build folder (and the FP32 model, when its source can
    still be loaded) with the settings recorded in its report.json unless given here."""
    import json

    from .artifact import Artifact
    from .errors import ToolchainError
    from . import runtimes
    from .runtime import load_runner, reference_runner

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
    sweep_runs = sweep_runs or recorded.get("sweep_runs") or max(p["runs"] for p in recorded["sweep"][1:] or recorded["sweep"])
    budget = budget_ms if budget_ms is not None else recorded["latency_budget_ms"]
    sample = recorded_signature(report["model"])
    settings = dict(batch_sizes=tuple(sizes), warmup=recorded["warmup_runs"], runs=runs, sweep_runs=sweep_runs,
                    threads=threads, budget_ms=budget)

    results = {}
    for a in artifacts:
        kernels = a.get("stage_facts", {}).get("quantize_torch", {}).get("kernels")  # as the build checked it (cpu.torch_kernels)
        artifact = Artifact(runtimes.get(a["runtime"]).kind, a["precision"], path=folder / a["path"], quantized_engine=a["engine"],
                            kernels=kernels if kernels != a["engine"] else None)
        if not artifact.path.is_file():
            raise ToolchainError(f"{folder}: artifact file `{a['path']}` is missing")
        log.info("timing %s", a["name"])
        b = bench(lambda: load_runner(artifact, a["runtime"], threads), sample, **settings)
        results[a["name"]] = {"runtime": a["runtime"], "engine": a["engine"], "size_bytes": artifact.size_bytes(),
                              "files": [p.name for p in artifact.files()], **b.to_json()}
    note = None
    try:
        from .load import load_model

        source = report["model"]["source"]  # loaded inside the bench, so its weights count in its memory, as an artifact's do
        def reference():
            from .build import bind_constants, fix_constants

            loaded = fix_constants(load_model(source, trust_pickle=False), recorded_constants(report["model"]), None, None,
                                   tuple(i["name"] for i in report["model"].get("inputs", [])))
            return reference_runner(bind_constants(loaded, sample.synthetic(2)).artifact, threads)

        b = bench(reference, sample, **settings)
        results = {"fp32_reference": {"runtime": "torch eager", "engine": None, "size_bytes": report["reference"]["size_bytes"],
                                      "files": [], **b.to_json()}, **results}
    except ToolchainError as e:
        note = f"FP32 reference not measured: {e}"
    return {"build": str(folder), "target": report["target"], "input_shape": report["model"]["input_shape"],
            "settings": {**settings, "batch_sizes": list(settings["batch_sizes"])}, "results": results, "note": note}


def busy_cores(p50_ms: float, profiled_ms: float, factor: float = 20.0) -> str | None:
    """Why a timed batch-1 latency cannot be trusted, or None: ``factor`` times the operator profile's
    own time per run (taken right after, on the same input). Torch's OpenMP threads wait on each
    other when other processes hold the cores, and its latency inflates 10-100x while the
    profiler's per-operator times barely move (a 0.05 ms model measured at 47 ms, seen here)."""
    if profiled_ms <= 0 or p50_ms < 1.0 or p50_ms < factor * profiled_ms:
        return None
    return (f"batch-1 latency {p50_ms:.2f} ms is {p50_ms / profiled_ms:.0f}x its operator profile's {profiled_ms:.3f} ms "
            f"per run: the cores were busy while it was timed; re-time the build alone (`toolchain bench BUILD_DIR`)")


def recorded_constants(model: dict) -> dict[str, object]:
    """The values a build fixed the model's non-tensor arguments at (report.json `model.constants`)."""
    return {c["name"]: c["value"] for c in model.get("constants", [])}


def recorded_signature(model: dict):
    """The inputs a report.json records (older reports: one float input of `input_shape`)."""
    from .feed import InputSpec, Signature

    if not model.get("inputs"):
        return tuple(model["input_shape"][1:])
    return Signature(tuple(InputSpec(i["name"], tuple(i["shape"] if i["scalar"] else i["shape"][1:]), i["dtype"],
                                     tuple(a - (0 if i["scalar"] else 1) for a in i["dynamic_axes"]), i["scalar"])
                           for i in model["inputs"]))


def _memory_mb(n: int | None) -> str:
    """Resident memory the model added; under 0.1 MB is said as such, not as 0.0."""
    return "n/a" if n is None else (f"{n / 2**20:.1f}" if n >= 2**20 / 10 else "<0.1")


def bench_table(data: dict[str, Any]) -> str:
    sizes = data["settings"]["batch_sizes"]
    head = ["model", "p50 ms", "p95 ms", "p99 ms", *[f"b{b} samples/s" for b in sizes], "best batch", "peak MB", "size MB"]
    rows = []
    for name, r in data["results"].items():
        one = r["sweep"][0]
        thr = {p["batch_size"]: p["throughput"] for p in r["sweep"]}
        rows.append([name, f"{one['p50_ms']:.3f}", f"{one['p95_ms']:.3f}", f"{one['p99_ms']:.3f}",
                     *[f"{thr[b]:,.1f}" for b in sizes], str(r["best_batch"] or "none fits"),
                     _memory_mb(r["peak_memory_bytes"]),
                     f"{r['size_bytes'] / 2**20:.2f}" if r["size_bytes"] else ""])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)])
