"""Load an artifact from disk in the runtime it ships to, and run it on numpy inputs."""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .artifact import Artifact, Kind
from .errors import ToolchainError
from .export import as_module
from .registry import Registry


class Runner(Protocol):
    """Runs a batch; returns every output of the model, in order, as numpy arrays."""

    def __call__(self, x: np.ndarray) -> list[np.ndarray]: ...


RUNTIMES: Registry[Callable[..., Runner]] = Registry("runtime")


def torch_runner(model, threads: int) -> Runner:
    import torch

    torch.set_num_threads(threads)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return [t.numpy() for _, t in flatten_outputs(model(torch.from_numpy(x)))]

    return run


def reference_runner(artifact: Artifact, threads: int) -> Runner:
    """The FP32 model as loaded, in eager PyTorch."""
    return torch_runner(as_module(artifact), threads)


def load_torch_module(artifact: Artifact):
    """A TorchScript or lite-interpreter file, loaded under the engine its INT8 weights were packed for."""
    import torch

    if artifact.engine:
        torch.backends.quantized.engine = artifact.engine  # packed weights unpack on load, on this engine
    if artifact.kind is Kind.LITE:
        from torch.jit.mobile import _load_for_lite_interpreter  # PyTorch Mobile's runtime, on the host

        return _load_for_lite_interpreter(str(artifact.path))
    return torch.jit.load(str(artifact.path), map_location="cpu")


def _torchscript(artifact: Artifact, threads: int) -> Runner:
    return torch_runner(load_torch_module(artifact), threads)


def _onnxruntime(artifact: Artifact, threads: int) -> Runner:
    session = onnxruntime_session(artifact.path, threads)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})

    return run


def onnxruntime_session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def native_stderr_off():
    """Silence what native code writes to file descriptor 2 (Python's own errors still raise)."""
    with native_stderr() as _:
        yield


@contextlib.contextmanager
def native_stderr():
    """Capture what native code logs: to file descriptor 2, or through Python's ``sys.stderr``
    (ExecuTorch's Python bindings route the runtime's log there). The list holds the lines
    after exit."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    python_side = io.StringIO()
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                with contextlib.redirect_stderr(python_side):
                    yield lines
            finally:
                ctypes.CDLL(None).fflush(None)  # C stdio buffers, so the lines land in the sink
                os.dup2(saved, 2)
                sink.seek(0)
                lines.extend(sink.read().decode(errors="replace").splitlines())
                lines.extend(python_side.getvalue().splitlines())
    finally:
        os.close(saved)


def load_runner(artifact: Artifact, runtime: str, threads: int) -> Runner:
    """Load ``artifact`` back from its file, so what is checked is what ships."""
    if artifact.path is None:
        raise ToolchainError(f"artifact {artifact.lineage} has no file to load")
    return RUNTIMES.get(runtime)(artifact, threads)


def flatten_outputs(output, path: str = "") -> list[tuple[str, object]]:
    """Every tensor a model returns, in the order ONNX export and ExecuTorch flatten them,
    named by its dict key or named-tuple field where it has one, else by its position."""
    if isinstance(output, dict):
        items = [(str(k), v) for k, v in output.items()]
    elif isinstance(output, tuple) and hasattr(output, "_fields"):
        items = list(zip(output._fields, output))
    elif isinstance(output, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(output)]
    else:
        return [(path, output)]
    out = []
    for key, value in items:
        out += flatten_outputs(value, f"{path}.{key}" if path else key)
    return out


def output_names(model_output) -> list[str]:
    """Names of a model's outputs (see flatten_outputs); position numbers where it gives none."""
    flat = flatten_outputs(model_output)
    return [name or str(i) for i, (name, _) in enumerate(flat)]


def load_executorch(path: Path, threads: int, enable_etdump: bool = False):
    """An ExecuTorch program and its ``forward`` method, with XNNPACK's thread pool (which
    defaults to every core) set to ``threads``. Returns (program, method, planned input shape):
    the program is memory-planned for that one shape."""
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    with native_stderr_off():  # the C++ runtime logs CPU probing and thread-pool resets
        portable_lib._unsafe_reset_threadpool(threads)
        program = Runtime.get().load_program(path, enable_etdump=enable_etdump)
        method = program.load_method("forward")
    return program, method, tuple(method.metadata.input_tensor_meta(0).sizes())


def _executorch(artifact: Artifact, threads: int) -> Runner:
    """ExecuTorch's Python runtime (the same C++ runtime and XNNPACK kernels a phone runs).

    Larger batches than the planned one run group by group in the planned batch size.
    """
    import torch

    _, method, shape = load_executorch(artifact.path, threads)
    with native_stderr_off():  # the first run logs XNNPACK's CPU probing
        method.execute([torch.zeros(shape)])
    planned = shape[0]

    def run(x: np.ndarray) -> list[np.ndarray]:
        parts = []
        for start in range(0, len(x), planned):
            chunk = np.ascontiguousarray(x[start:start + planned], dtype=np.float32)
            short = planned - len(chunk)
            if short:
                chunk = np.concatenate([chunk, np.zeros((short, *chunk.shape[1:]), np.float32)])
            outs = method.execute([torch.from_numpy(chunk)])
            parts.append([t.numpy()[:planned - short] for _, t in flatten_outputs(list(outs))])
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    return run


# The libraries each runtime needs (import names), for `toolchain doctor` and for skipping the
# artifacts of a runtime that is missing here with the reason. TensorRT engines run on the device
# only (`toolchain engine build`); the entry says what that needs.
RUNTIME_REQUIRES = {"torchscript": ("torch",), "onnxruntime": ("onnxruntime",), "executorch": ("executorch",),
                    "lite_interpreter": ("torch",), "tensorrt": ("tensorrt", "cuda")}

RUNTIMES.register("torchscript", _torchscript)
RUNTIMES.register("onnxruntime", _onnxruntime)
RUNTIMES.register("executorch", _executorch)
RUNTIMES.register("lite_interpreter", _torchscript)
