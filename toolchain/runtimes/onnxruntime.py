"""ONNX files in ONNX Runtime's CPU execution provider; profiled with its built-in profiler
(one event per node execution)."""

from __future__ import annotations

import collections
import json
import tempfile
from pathlib import Path

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.feed import ort_feed
from toolchain.runtimes import Runtime, register


def session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load(artifact: Artifact, threads: int):
    s = session(artifact.path, threads)
    names = [i.name for i in s.get_inputs()]

    def run(x) -> list[np.ndarray]:
        return s.run(None, ort_feed(x, names))

    return run


def profile(artifact: Artifact, x: np.ndarray, runs: int, threads: int):
    """Per op type: the node executions after the warm-up runs."""
    from toolchain.measure.profiling import WARMUP, summarize

    with tempfile.TemporaryDirectory() as tmp:
        s = session(artifact.path, threads, profile_prefix=str(Path(tmp) / "ort"))
        feed = ort_feed(x, [i.name for i in s.get_inputs()])
        for _ in range(WARMUP + runs):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
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


RUNTIME = register(Runtime("onnxruntime", Kind.ONNX, "onnx", ".onnx", ("onnxruntime",), load, profile))
