"""PyTorch Mobile lite-interpreter files (`.ptl`), run on the host by the same interpreter a phone embeds."""

from __future__ import annotations

from toolchain.core.artifact import Artifact, Kind
from toolchain.runtimes import Runtime, register
from toolchain.runtimes.torchscript import load_module, profile


def load(artifact: Artifact, threads: int):
    """A runner of the file. A model that keeps state between calls (``artifact.state``: the lite
    interpreter's modules cannot be given their saved values back) is loaded afresh for every call,
    so each starts from the state it was saved with, as the reference does."""
    from toolchain.core.runner import torch_runner

    if artifact.state is None:
        return torch_runner(load_module(artifact), threads)

    def fresh(*args):
        return load_module(artifact)(*args)

    return torch_runner(fresh, threads)


RUNTIME = register(
    Runtime("lite_interpreter", Kind.LITE, "torchscript-lite", ".ptl", ("torch",), load, profile)
)
