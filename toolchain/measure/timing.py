"""Timing and memory of a runner: batch-1 latency percentiles, a batch-size sweep, peak memory, and
alternating loops for comparing variants in one run."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from toolchain.core.feed import Signature
from toolchain.core.heap import collect


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
    # resident memory the model adds, loading and running up to the largest batch
    peak_memory_bytes: int | None
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


def time_runs(
    runner: Callable[[np.ndarray], Any],
    x: np.ndarray,
    warmup: int,
    runs: int,
    max_seconds: float | None = None,
) -> np.ndarray:
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


# Pause before a runner's turn: the worker threads of the runner timed before it (torch's OpenMP pool,
# ONNX Runtime's and OpenVINO's) spin for a while after their last call and would take its cores.
SETTLE_S = 0.05
# timed runs per turn: a turn starts with one untimed run (caches, the pool waking up)
BURST = 5


def time_alternating(
    runners: dict[str, Callable[[Any], Any]], x, rounds: int, warmup: int = 20
) -> dict[str, float]:
    """Median milliseconds of each runner on ``x``, the runners timed in turn (``rounds`` timed runs
    each, after ``warmup``): a slow moment of the machine hits all of them, so their ratios hold where
    their absolute figures would not (benchmarks compare variants this way)."""
    return {label: float(np.median(v)) for label, v in time_in_turn(runners, x, rounds, warmup).items()}


def time_in_turn(
    runners: dict[str, Callable[[Any], Any]], x, rounds: int, warmup: int = 20
) -> dict[str, list[float]]:
    """``rounds`` timed runs' milliseconds per runner, the runners taking turns of up to :data:`BURST`
    runs, each turn after a pause of :data:`SETTLE_S` and one untimed run. Turns of one run each, back
    to back, measured every runtime about twice as slow as it runs alone when the runners belong to
    different runtimes (ResNet18 INT8 here: torch, ONNX Runtime and OpenVINO 10-14 ms in single-run
    turns, 5.7-6.7 ms in turns of 5 after a 50 ms pause, 6.0 ms each timed alone, 2026-12-07): each
    runtime's threads spin after a call and take the cores from the next."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {label: [] for label in runners}
    while any(len(v) < rounds for v in times.values()):
        for label, run in runners.items():
            n = min(BURST, rounds - len(times[label]))
            if n <= 0:
                continue
            if len(runners) > 1:
                time.sleep(SETTLE_S)
                run(x)
            for _ in range(n):
                start = time.perf_counter_ns()
                run(x)
                times[label].append((time.perf_counter_ns() - start) / 1e6)
    return times


def bench(
    load: Callable[[], Callable[[np.ndarray], Any]],
    inputs: "Signature | tuple[int, ...]",
    batch_sizes: tuple[int, ...],
    warmup: int,
    runs: int,
    threads: int,
    budget_ms: float | None,
    sweep_runs: int | None = None,
    seed: int = 0,
) -> Bench:
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
    from toolchain.core.feed import InputSpec, Signature

    signature = inputs if isinstance(inputs, Signature) else Signature((InputSpec("input", tuple(inputs)),))
    sizes = sorted({1, *batch_sizes})
    inputs = {b: signature.synthetic(b, seed + b) for b in sizes}
    first = load()  # thrown away: what a runtime does once per process is not the model's memory
    # batch 1 is enough to start its thread pools and caches; larger batches would only cost time
    first(inputs[1])
    del first
    baseline = _reset_peak()
    runner = load()
    points = [_time_batch(runner, inputs[b], warmup, runs, sweep_runs) for b in sizes]
    peak = _peak_since(baseline)
    fitting = [
        p for p in points if p.batch_size in batch_sizes and (budget_ms is None or p.p95_ms <= budget_ms)
    ]
    best = max(fitting, key=lambda p: p.throughput).batch_size if fitting else None
    return Bench(threads, warmup, tuple(points), best, budget_ms, peak, sweep_runs or runs)


def _time_batch(
    runner: Callable[[np.ndarray], Any], x: np.ndarray, warmup: int, runs: int, sweep_runs: int | None
) -> BatchPoint:
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

    Garbage is collected (:func:`toolchain.core.heap.collect`) and the C heap's free pages handed
    back to the system first (glibc's malloc_trim), so that what is allocated next shows as new
    resident pages instead of reusing pages an earlier model freed (which made a model appear to
    cost nothing)."""
    collect()
    # not glibc: freed pages may be reused, the count runs low
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status("VmRSS")


def _peak_since(baseline: int | None) -> int | None:
    peak = _status("VmHWM")
    return None if baseline is None or peak is None else max(0, peak - baseline)


def busy_cores(p50_ms: float, profiled_ms: float, factor: float = 20.0) -> str | None:
    """Why a timed batch-1 latency cannot be trusted, or None: ``factor`` times the operator profile's
    own time per run (taken right after, on the same input). Torch's OpenMP threads wait on each
    other when other processes hold the cores, and its latency inflates 10-100x while the
    profiler's per-operator times barely move (a 0.05 ms model measured at 47 ms, seen here)."""
    if profiled_ms <= 0 or p50_ms < 1.0 or p50_ms < factor * profiled_ms:
        return None
    return (
        f"batch-1 latency {p50_ms:.2f} ms is {p50_ms / profiled_ms:.0f}x its operator profile's "
        f"{profiled_ms:.3f} ms per run: the cores were busy while it was timed; re-time the build alone "
        "(`toolchain bench BUILD_DIR`)"
    )
