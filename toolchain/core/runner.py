"""A runner: a callable that takes a batch of numpy inputs and returns every output of the model.
The FP32 model's runner in eager PyTorch, and the flattening of a model's outputs into that list.
Loading a shipped artifact in its own runtime is :func:`toolchain.runtimes.load_runner`."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from toolchain.core.artifact import Artifact
from toolchain.core.export import as_module


class Runner(Protocol):
    """Runs a batch; returns every output of the model, in order, as numpy arrays."""

    def __call__(self, x: np.ndarray) -> list[np.ndarray]: ...


def torch_runner(model, threads: int | None = None, state=None) -> Runner:
    """``model`` in eager PyTorch on numpy batches; ``threads`` sets torch's intra-op threads (None:
    as they are), process-wide, so at each call where another runner changed them (the primary's race
    times one model on two counts). ``state`` (a :class:`toolchain.core.state.SavedState`): each call
    starts from it, and the model is left there after it."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from toolchain.core.feed import torch_args

    def run(x) -> list[np.ndarray]:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if state is not None:
            state.restore(model)
        try:
            with torch.inference_mode():
                return [t.numpy() for _, t in flatten_outputs(model(*torch_args(x)))]
        finally:
            if state is not None:
                state.restore(model)

    return run


def reference_runner(artifact: Artifact, threads: int) -> Runner:
    """The FP32 model as loaded, in eager PyTorch."""
    return torch_runner(as_module(artifact), threads, artifact.state)


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
