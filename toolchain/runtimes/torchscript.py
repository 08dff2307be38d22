"""TorchScript files (`.pt`) in PyTorch's JIT runtime, INT8 ones on the quantized engine
their weights were packed for."""

from __future__ import annotations

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.runtimes import Runtime, register


def load_module(artifact: Artifact):
    """A TorchScript or lite-interpreter file, loaded under the engine its INT8 weights were packed for."""
    import torch

    # the deployment CPU's kernels, not the host's dispatch
    engine = artifact.kernels or artifact.quantized_engine
    if engine:
        torch.backends.quantized.engine = engine  # packed weights unpack on load, on this engine
    if artifact.kind is Kind.LITE:
        from torch.jit.mobile import _load_for_lite_interpreter  # PyTorch Mobile's runtime, on the host

        return _load_for_lite_interpreter(str(artifact.path))
    return torch.jit.load(str(artifact.path), map_location="cpu")


def load(artifact: Artifact, threads: int):
    from toolchain.core.runner import torch_runner
    from toolchain.core.state import SavedState

    module = load_module(artifact)
    # a stateful model's file holds the state it was saved with: each call starts from there
    state = SavedState.of(module) if artifact.kind is Kind.TORCHSCRIPT else None
    return torch_runner(module, threads, state)


def profile(artifact: Artifact, x: np.ndarray, runs: int, threads: int):
    """torch.profiler: self CPU time, calls, input shapes and memory of each operator."""
    from toolchain.measure.profiling import profile_torch

    return profile_torch(load_module(artifact), x, runs, threads)


RUNTIME = register(Runtime("torchscript", Kind.TORCHSCRIPT, "torchscript", ".pt", ("torch",), load, profile))
