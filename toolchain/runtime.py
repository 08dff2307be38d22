"""Load an artifact from disk in the runtime it ships to, and run it on numpy inputs."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import sys
import tempfile
from typing import Protocol

import numpy as np

from .artifact import Artifact
from .errors import ToolchainError
from .export import as_module


class Runner(Protocol):
    """Runs a batch; returns every output of the model, in order, as numpy arrays."""

    def __call__(self, x: np.ndarray) -> list[np.ndarray]: ...


def keeps_torch_settings(fn):
    """Stages and runtimes set torch's process-wide quantized engine and thread count for the
    artifact at hand; a library caller gets its own back when the call returns, however it ends."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            import torch
        except ImportError:  # a device image without torch (TensorRT engines only): nothing to keep
            return fn(*args, **kwargs)
        engine, threads = torch.backends.quantized.engine, torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.backends.quantized.engine = engine
            torch.set_num_threads(threads)

    return wrapper


def torch_runner(model, threads: int) -> Runner:
    import torch

    torch.set_num_threads(threads)

    from .feed import torch_args

    def run(x) -> list[np.ndarray]:
        with torch.inference_mode():
            return [t.numpy() for _, t in flatten_outputs(model(*torch_args(x)))]

    return run


def reference_runner(artifact: Artifact, threads: int) -> Runner:
    """The FP32 model as loaded, in eager PyTorch."""
    return torch_runner(as_module(artifact), threads)


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
    """Load ``artifact`` back from its file in ``runtime`` (see toolchain.runtimes), so what is checked is what ships."""
    from .runtimes import get

    if artifact.path is None:
        raise ToolchainError(f"artifact {artifact.lineage} has no file to load")
    return get(runtime).load(artifact, threads)


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
