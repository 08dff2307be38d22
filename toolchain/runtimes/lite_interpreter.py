"""PyTorch Mobile lite-interpreter files (`.ptl`), run on the host by the same interpreter a phone embeds."""

from __future__ import annotations

from ..artifact import Kind
from . import Runtime, register
from .torchscript import load, profile

RUNTIME = register(Runtime("lite_interpreter", Kind.LITE, "torchscript-lite", ".ptl", ("torch",), load, profile))
