"""Serialized TensorRT engines, on the device that built them (an engine is tied to its GPU and
TensorRT version): `toolchain engine build` loads and checks them here. Inputs run in chunks the
engine's optimization profile accepts (see :func:`toolchain.tensorrt.engine.run_engine`)."""

from __future__ import annotations

import json

from toolchain.core.artifact import Artifact, Kind
from toolchain.runtimes import Runtime, register


def load(artifact: Artifact, threads: int):
    """A runner for the engine at ``artifact.path``, within the batch limits of the build folder's plan."""
    from toolchain.tensorrt.engine import run_engine

    plan = json.loads((artifact.path.parent / "engine_plan.json").read_text())["input"]
    static = plan["opt"][0] if plan.get("static") else None
    return lambda x: run_engine(artifact.path, x, plan["max"][0], static)


RUNTIME = register(
    Runtime("tensorrt", Kind.ENGINE, "tensorrt-engine", ".engine", ("tensorrt", "cuda"), load, where="device")
)
