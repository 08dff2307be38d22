"""Per-operator profiles: where an artifact's time goes, in its own runtime's profiler.

- PyTorch (the FP32 reference, TorchScript, the lite interpreter): ``torch.profiler``, with
  self CPU time, calls, input shapes and memory allocated by each operator.
- ONNX Runtime: its built-in profiler (one event per node execution), grouped by op type.
- ExecuTorch: an ETDump recorded by the runtime, read with ExecuTorch's Inspector; delegated
  programs report XNNPACK's own operators (e.g. ``Convolution (NHWC, QC8) IGEMM``).

Every profile is written to ``profiles/<name>.json`` in the build folder: the top operators
by self time per run, each with its share of the profiled total.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .artifact import Artifact
from .registry import Registry

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
class Profile:
    tool: str
    runs: int
    batch_size: int
    threads: int
    total_ms: float  # sum of every operator's self time, per run
    operator_count: int  # distinct operators seen (the list keeps the top ones)
    operators: tuple[OperatorTime, ...]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILERS: Registry[Callable[..., Profile]] = Registry("profiler")


def summarize(tool: str, rows: list[tuple[str, float, float, Any, Any]], runs: int, x: np.ndarray, threads: int) -> Profile:
    """``rows`` are (name, total self ms, total calls, input shapes, memory bytes) over all runs."""
    total = sum(r[1] for r in rows) / runs
    ops = sorted(rows, key=lambda r: -r[1])
    top = tuple(
        OperatorTime(name, round(ms / runs, 4), round(calls / runs, 2), round(ms / runs / total, 4) if total else 0.0,
                     shapes, None if mem is None else int(mem / runs))
        for name, ms, calls, shapes, mem in ops[:TOP]
    )
    return Profile(tool, runs, len(x), threads, round(total, 4), len(rows), top)


def profile_torch(call: Callable[[Any], Any], x: np.ndarray, runs: int, threads: int) -> Profile:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from .runtime import native_stderr_off

    torch.set_num_threads(threads)
    t = torch.from_numpy(np.ascontiguousarray(x))
    done = []  # the profiler's first recorded steps carry its own start-up cost: two warm-up steps are dropped
    plan = schedule(wait=0, warmup=WARMUP, active=runs, repeat=1)
    with torch.inference_mode(), native_stderr_off(), profile(
        activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True, schedule=plan, on_trace_ready=done.append,
    ) as prof:
        for _ in range(WARMUP + runs):
            call(t)
            prof.step()
    shapes = {}
    for e in done[0].key_averages(group_by_input_shape=True):
        shapes.setdefault(e.key, [list(s) for s in e.input_shapes if s])
    rows = [(e.key, e.self_cpu_time_total / 1000, e.count, shapes.get(e.key), e.self_cpu_memory_usage)
            for e in done[0].key_averages() if e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep")]
    return summarize("torch.profiler", rows, runs, x, threads)


def _torch_artifact(artifact: Artifact, x: np.ndarray, runs: int, threads: int) -> Profile:
    from .runtime import load_torch_module

    module = load_torch_module(artifact)
    return profile_torch(module, x, runs, threads)


def _onnxruntime(artifact: Artifact, x: np.ndarray, runs: int, threads: int) -> Profile:
    from .runtime import onnxruntime_session

    with tempfile.TemporaryDirectory() as tmp:
        session = onnxruntime_session(artifact.path, threads, profile_prefix=str(Path(tmp) / "ort"))
        name = session.get_inputs()[0].name
        feed = {name: np.ascontiguousarray(x, dtype=np.float32)}
        for _ in range(WARMUP + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, None, 0])
    seen: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        seen[e["name"]] += 1
        if seen[e["name"]] <= WARMUP:  # each node's first executions are the warm-up runs
            continue
        args = e.get("args", {})
        row = by_op[args.get("op_name", e["name"])]
        row[0] += e["dur"] / 1000
        row[1] += 1
        row[2] = row[2] or [list(next(iter(s.values()))) for s in args.get("input_type_shape", [])]
        row[3] += int(args.get("output_size", 0))
    rows = [(op, ms, calls, shapes, mem) for op, (ms, calls, shapes, mem) in by_op.items()]
    return summarize("onnxruntime profiler", rows, runs, x, threads)


def _executorch(artifact: Artifact, x: np.ndarray, runs: int, threads: int) -> Profile:
    import torch

    from .runtime import load_executorch, native_stderr_off

    program, method, shape = load_executorch(artifact.path, threads, enable_etdump=True)
    planned = shape[0]
    with native_stderr_off(), tempfile.TemporaryDirectory() as tmp:
        chunk = torch.from_numpy(np.ascontiguousarray(x[:planned], dtype=np.float32))
        for _ in range(WARMUP + runs):
            method.execute([chunk])
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        from executorch.devtools import Inspector

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Output Buffer not found": no debug buffer asked for, timings only
            inspector = Inspector(etdump_path=str(etdump))
    by_op: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    whole = 0.0  # Method::execute spans every operator: only its time outside them is its own
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            if event.perf_data is None or event.name == "DELEGATE_CALL" and len(block.events) > 2:
                continue
            kept = event.perf_data.raw[WARMUP:]  # one entry per run, in order
            if event.name == "Method::execute":
                whole += float(sum(kept))
                continue
            row = by_op[_EVENT_NUMBER.sub("", event.name)]
            row[0] += float(sum(kept))
            row[1] += len(kept)
    rows = [(op, ms, calls, None, None) for op, (ms, calls) in by_op.items()]
    inside = sum(r[1] for r in rows)
    if whole > inside:
        rows.append(("(runtime, outside operators)", whole - inside, runs, None, None))
    return summarize("executorch etdump", rows, runs, x[:planned], threads)


_EVENT_NUMBER = re.compile(r"\s*#\d+$")

PROFILERS.register("torchscript", _torch_artifact)
PROFILERS.register("lite_interpreter", _torch_artifact)
PROFILERS.register("onnxruntime", _onnxruntime)
PROFILERS.register("executorch", _executorch)


def write_profile(profile: Profile, folder: Path, name: str) -> str:
    """Write ``profiles/<name>.json``; returns its path relative to the build folder."""
    (folder / "profiles").mkdir(exist_ok=True)
    rel = f"profiles/{name}.json"
    (folder / rel).write_text(json.dumps(profile.to_json(), indent=1) + "\n")
    return rel
