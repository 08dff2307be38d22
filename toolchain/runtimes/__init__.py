"""The runtimes an artifact is loaded, checked and profiled in: one module each.

A runtime module builds one :class:`Runtime` and registers it; nothing else in the package names
a runtime. Adding one (say OpenVINO) is one new module here, added to ``MODULES``, and an
artifact in a target profile whose ``runtime`` names it. Modules import their libraries only
inside the functions that need them: listing runtimes (``toolchain targets``, ``doctor``) stays
instant and works where a library is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Callable

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.errors import ToolchainError
from toolchain.core.registry import Registry

if TYPE_CHECKING:
    import numpy as np

    from toolchain.core.runner import Runner
    from toolchain.measure.profiling import OperatorProfile

MODULES = ("torchscript", "lite_interpreter", "onnxruntime", "executorch", "openvino", "qnn", "tensorrt")


@dataclasses.dataclass(frozen=True)
class Runtime:
    name: str
    kind: Kind  # what it loads: the kind an artifact's chain of stages must end in
    format: str  # the artifact's format, as the report names it
    suffix: str  # of the shipped file
    requires: tuple[str, ...]  # libraries (import names): see `toolchain doctor`
    load: Callable[[Artifact, int], "Runner"]  # (artifact, threads) -> runs a batch, returns every output
    profile: Callable[[Artifact, "np.ndarray", int, int], "OperatorProfile"] | None = (
        None  # (artifact, x, runs, threads)
    )
    where: str = "host"  # "host": checked in the build; "device": only where the target's hardware is
    # runs the device's code through an emulator on the host: its outputs count, its latency does not
    emulated: bool = False


RUNTIMES: Registry[Runtime] = Registry("runtime")


def register(runtime: Runtime) -> Runtime:
    return RUNTIMES.register(runtime.name, runtime)


def get(name: str) -> Runtime:
    _load_all()
    return RUNTIMES.get(name)


def names() -> list[str]:
    _load_all()
    return list(RUNTIMES)


def _load_all() -> None:
    for module in MODULES:
        importlib.import_module(f"{__name__}.{module}")


def load_runner(artifact: Artifact, runtime: str, threads: int) -> Runner:
    """Load ``artifact`` back from its file in ``runtime`` (see toolchain.runtimes), so
    what is checked is what ships."""
    if artifact.path is None:
        raise ToolchainError(f"artifact {artifact.lineage} has no file to load")
    return get(runtime).load(artifact, threads)
