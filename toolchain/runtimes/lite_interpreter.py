"""PyTorch Mobile lite-interpreter files (`.ptl`), run on the host by the same interpreter a phone embeds."""

from __future__ import annotations

from toolchain.core.artifact import Kind
from toolchain.runtimes import Runtime, register
from toolchain.runtimes.torchscript import load, profile

RUNTIME = register(
    Runtime("lite_interpreter", Kind.LITE, "torchscript-lite", ".ptl", ("torch",), load, profile)
)
