"""ExecuTorch programs (`.pte`) in ExecuTorch's Python runtime: the same C++ runtime and XNNPACK
kernels a phone runs. Profiled from an ETDump read with ExecuTorch's Inspector (delegated programs
report XNNPACK's own operators, e.g. ``Convolution (NHWC, QC8) IGEMM``)."""

from __future__ import annotations

import collections
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.runtimes import Runtime, register

_EVENT_NUMBER = re.compile(r"\s*#\d+$")


def load_program(path: Path, threads: int, enable_etdump: bool = False):
    """An ExecuTorch program and its ``forward`` method, with XNNPACK's thread pool (which
    defaults to every core) set to ``threads``. Returns (program, method, planned input shape):
    the program is memory-planned for that one shape."""
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime as ExecuTorchRuntime

    from toolchain.core.native import native_stderr_off

    with native_stderr_off():  # the C++ runtime logs CPU probing and thread-pool resets
        portable_lib._unsafe_reset_threadpool(threads)
        program = ExecuTorchRuntime.get().load_program(path, enable_etdump=enable_etdump)
        method = program.load_method("forward")
    return program, method, tuple(method.metadata.input_tensor_meta(0).sizes())


def load(artifact: Artifact, threads: int):
    """Larger batches than the planned one run group by group in the planned batch size."""
    from toolchain.core.native import native_stderr_off
    from toolchain.core.runner import flatten_outputs

    _, method, shape = load_program(artifact.path, threads)
    planned = shape[0]
    quiet = [True]  # the first run logs XNNPACK's CPU probing

    def run(x) -> list[np.ndarray]:
        parts = []
        for start in range(0, len(x), planned):
            chunk = x[start : start + planned]
            valid = len(chunk)
            args = _planned_args(chunk, planned)
            if quiet[0]:
                with native_stderr_off():
                    outs = method.execute(args)
                quiet[0] = False
            else:
                outs = method.execute(args)
            parts.append([t.numpy()[:valid] for _, t in flatten_outputs(list(outs))])
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    return run


def _planned_args(chunk, planned: int) -> list:
    """A batch as the program's arguments, filled up to the planned batch size (the extra
    rows' outputs are dropped)."""
    from toolchain.core.feed import Feed, repeat_to, torch_args

    if not isinstance(chunk, Feed):
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
    return list(torch_args(repeat_to(chunk, planned) if len(chunk) < planned else chunk))


def profile(artifact: Artifact, x: np.ndarray, runs: int, threads: int):
    from toolchain.core.native import native_stderr_off
    from toolchain.measure.profiling import WARMUP, summarize

    program, method, shape = load_program(artifact.path, threads, enable_etdump=True)
    planned = shape[0]
    with native_stderr_off(), tempfile.TemporaryDirectory() as tmp:
        args = _planned_args(x[:planned], planned)
        for _ in range(WARMUP + runs):
            method.execute(args)
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        from executorch.devtools import Inspector

        with warnings.catch_warnings():
            # "Output Buffer not found": no debug buffer asked for, timings only
            warnings.simplefilter("ignore")
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


RUNTIME = register(
    Runtime("executorch", Kind.EXECUTORCH, "executorch", ".pte", ("executorch",), load, profile)
)
