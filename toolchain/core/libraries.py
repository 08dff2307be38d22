"""Libraries the stages and runtimes need, found without importing them (so `toolchain doctor`
and planning stay instant), with their versions and how to install what is missing."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util

# import name -> (distribution to ask for its version, how to get it)
LIBRARIES = {
    "torch": ("torch", "pip install torch==2.14.1 (the pinned build)"),
    "onnx": ("onnx", "pip install onnx"),
    "onnxoptimizer": ("onnxoptimizer", "pip install onnxoptimizer"),
    "onnxruntime": ("onnxruntime", "pip install onnxruntime"),
    "executorch": ("executorch", "pip install executorch (Linux/macOS, Python 3.10-3.12)"),
    "torchao": ("torchao", "installed with executorch"),
    "openvino": ("openvino", "pip install openvino (a dependency of the toolchain)"),
    "nncf": ("nncf", "pip install nncf (a dependency of the toolchain)"),
    "onnxruntime_qnn": ("onnxruntime-qnn", "pip install 'toolchain[qnn]' (x86-64 Linux, glibc >= 2.35)"),
    "tensorrt": (
        "tensorrt",
        "TensorRT is not on the package registries: use JetPack on the device or NVIDIA's images",
    ),
    "cuda": ("cuda-python", "pip install 'toolchain[tensorrt]' (cuda-python)"),
}


@dataclasses.dataclass(frozen=True)
class Library:
    name: str
    version: str | None  # None: missing
    how: str  # how to get it, when missing

    @property
    def reason(self) -> str | None:
        return None if self.version else f"{self.name} is not installed ({self.how})"


@functools.cache
def library(name: str) -> Library:
    distribution, how = LIBRARIES.get(name, (name, f"pip install {name}"))
    if importlib.util.find_spec(name) is None:
        return Library(name, None, how)
    try:
        return Library(name, importlib.metadata.version(distribution), how)
    except importlib.metadata.PackageNotFoundError:
        return Library(name, "installed (version unknown)", how)


def missing(requires: tuple[str, ...]) -> str | None:
    """Why something that needs ``requires`` cannot run here (None when it can)."""
    reasons = [library(n).reason for n in requires if library(n).reason]
    return "; ".join(reasons) or None
