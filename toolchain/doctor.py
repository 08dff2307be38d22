"""What this machine can build and run: each library a stage or runtime needs, with its version or
the reason it is missing. Found without importing anything (``toolchain targets`` and ``toolchain
doctor`` stay instant, and a broken optional library cannot break them)."""

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
    "openvino": ("openvino", "pip install 'toolchain[openvino]'"),
    "onnxruntime_qnn": ("onnxruntime-qnn", "pip install 'toolchain[qnn]' (x86-64 Linux, glibc >= 2.35)"),
    "tensorrt": ("tensorrt", "TensorRT is not on the package registries: use JetPack on the device or NVIDIA's images"),
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


def report() -> dict[str, list[dict]]:
    """Every runtime and stage with the libraries it needs, and whether it is available here."""
    from . import runtimes, stages  # noqa: F401  (stages register themselves; none imports its libraries at import time)
    from .stage import STAGES

    def row(name: str, requires: tuple[str, ...]) -> dict:
        return {"name": name, "available": missing(requires) is None, "reason": missing(requires),
                "libraries": {n: library(n).version for n in requires}}

    return {"runtimes": [row(n, runtimes.get(n).requires) for n in runtimes.names()],
            "stages": [row(n, STAGES.get(n).requires) for n in STAGES]}


def lines(data: dict[str, list[dict]]) -> list[str]:
    out = []
    for section in ("runtimes", "stages"):
        out.append(f"{section}:")
        for r in data[section]:
            versions = ", ".join(f"{k} {v}" for k, v in r["libraries"].items() if v)
            state = f"ok ({versions})" if r["available"] else f"unavailable: {r['reason']}"
            out.append(f"  {r['name']:<18} {state}")
    return out
