"""Per-operator profiles: where an artifact's time goes, in its own runtime's profiler (each
runtime module in toolchain.runtimes has its ``profile``; ``torch.profiler`` for the FP32
reference and TorchScript files lives here, with the summary every profiler ends in).

Every profile is written to ``profiles/<name>.json`` in the build folder: the top operators
by self time per run, each with its share of the profiled total.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

TOP = 15
WARMUP = 2  # runs before the recorded ones, in every profiler


@dataclasses.dataclass(frozen=True)
class OperatorTime:
    name: str
    self_ms: float  # per run
    calls: float  # per run
    share: float  # of the profile's total self time
    input_shapes: list | None = None
    memory_bytes: int | None = None  # allocated by the operator itself, per run


@dataclasses.dataclass(frozen=True)
class OperatorProfile:
    tool: str
    runs: int
    batch_size: int
    threads: int
    total_ms: float  # sum of every operator's self time, per run
    operator_count: int  # distinct operators seen (the list keeps the top ones)
    operators: tuple[OperatorTime, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(
    tool: str, rows: list[tuple[str, float, float, Any, Any]], runs: int, x: np.ndarray, threads: int
) -> OperatorProfile:
    """``rows`` are (name, total self ms, total calls, input shapes, memory bytes) over all runs."""
    total = sum(r[1] for r in rows) / runs
    ops = sorted(rows, key=lambda r: -r[1])
    top = tuple(
        OperatorTime(
            name,
            round(ms / runs, 4),
            round(calls / runs, 2),
            round(ms / runs / total, 4) if total else 0.0,
            shapes,
            None if mem is None else int(mem / runs),
        )
        for name, ms, calls, shapes, mem in ops[:TOP]
    )
    return OperatorProfile(tool, runs, len(x), threads, round(total, 4), len(rows), top)


def profile_torch(call: Callable[[Any], Any], x: np.ndarray, runs: int, threads: int) -> OperatorProfile:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from toolchain.core.native import native_stderr_off

    torch.set_num_threads(threads)
    from toolchain.core.feed import torch_args

    args = torch_args(x)
    # the profiler's first recorded steps carry its own start-up cost: two warm-up steps are dropped
    done = []
    plan = schedule(wait=0, warmup=WARMUP, active=runs, repeat=1)
    with (
        torch.inference_mode(),
        native_stderr_off(),
        profile(
            activities=[ProfilerActivity.CPU],
            record_shapes=True,
            profile_memory=True,
            schedule=plan,
            on_trace_ready=done.append,
        ) as prof,
    ):
        for _ in range(WARMUP + runs):
            call(*args)
            prof.step()
    shapes = {}
    for e in done[0].key_averages(group_by_input_shape=True):
        shapes.setdefault(e.key, [list(s) for s in e.input_shapes if s])
    rows = [
        (e.key, e.self_cpu_time_total / 1000, e.count, shapes.get(e.key), e.self_cpu_memory_usage)
        for e in done[0].key_averages()
        if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep")
    ]
    return summarize("torch.profiler", rows, runs, x, threads)


def write_profile(profile: OperatorProfile, folder: Path, name: str) -> str:
    """Write ``profiles/<name>.json``; returns its path relative to the build folder."""
    (folder / "profiles").mkdir(exist_ok=True)
    rel = f"profiles/{name}.json"
    (folder / rel).write_text(json.dumps(profile.to_json(), indent=1) + "\n")
    return rel
