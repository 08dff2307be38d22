"""Latency: warm up, then time many runs and keep the distribution, not one call."""

from __future__ import annotations

import dataclasses
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Latency:
    median_ms: float
    p95_ms: float
    runs: int
    batch_size: int
    threads: int


def measure(runner, x: np.ndarray, warmup: int, runs: int, threads: int) -> Latency:
    for _ in range(warmup):
        runner(x)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter_ns()
        runner(x)
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return Latency(round(float(np.median(times)), 4), round(float(np.percentile(times, 95)), 4), runs, len(x), threads)
