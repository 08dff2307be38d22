"""Load an artifact from disk in the runtime it ships to, and run it on numpy inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .artifact import Artifact, Kind
from .errors import ToolchainError
from .registry import Registry


class Runner(Protocol):
    def __call__(self, x: np.ndarray) -> np.ndarray: ...


RUNTIMES: Registry[Callable[..., Runner]] = Registry("runtime")


def torch_runner(model, threads: int) -> Runner:
    import torch

    torch.set_num_threads(threads)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return first_tensor(model(torch.from_numpy(x))).numpy()

    return run


def reference_runner(artifact: Artifact, threads: int) -> Runner:
    """The FP32 model as loaded, in eager PyTorch."""
    model = artifact.model.module() if artifact.kind is Kind.EXPORTED else artifact.model
    return torch_runner(model, threads)


def _torchscript(artifact: Artifact, threads: int) -> Runner:
    import torch

    if artifact.engine:
        torch.backends.quantized.engine = artifact.engine  # packed weights unpack on load, on this engine
    return torch_runner(torch.jit.load(str(artifact.path), map_location="cpu"), threads)


def _onnxruntime(artifact: Artifact, threads: int) -> Runner:
    session = onnxruntime_session(artifact.path, threads)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

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


def load_runner(artifact: Artifact, runtime: str, threads: int) -> Runner:
    """Load ``artifact`` back from its file, so what is checked is what ships."""
    if artifact.path is None:
        raise ToolchainError(f"artifact {artifact.lineage} has no file to load")
    return RUNTIMES.get(runtime)(artifact, threads)


def first_tensor(output):
    """Models that return tuples or dicts are compared on their first tensor."""
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    if isinstance(output, dict):
        return first_tensor(next(iter(output.values())))
    return output


RUNTIMES.register("torchscript", _torchscript)
RUNTIMES.register("onnxruntime", _onnxruntime)
