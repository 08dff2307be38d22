"""The one object that flows between stages."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from enum import Enum
from pathlib import Path
from typing import Any


class Kind(str, Enum):
    """What an artifact holds; stages declare which kinds they accept."""

    EAGER = "torch.nn.Module"
    FX = "torch.fx.GraphModule"
    EXPORTED = "torch.export.ExportedProgram"
    TORCHSCRIPT = "torchscript"
    ONNX = "onnx"
    EXECUTORCH = "executorch"  # a .pte program (XNNPACK-delegated or portable kernels)
    LITE = "torchscript-lite"  # a PyTorch Mobile lite-interpreter .ptl file
    ENGINE = "tensorrt-engine"  # a serialized TensorRT engine, built on the device it runs on
    OPENVINO = "openvino-ir"  # OpenVINO IR: a .xml graph and its .bin weights

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A model at one point of the pipeline.

    ``model`` is the in-memory object for PyTorch kinds; ``path`` is set once the artifact
    lives on disk (ONNX, ExecuTorch and lite-interpreter artifacts always do). Stages never mutate
    ``model``: they copy it first.
    """

    kind: Kind
    precision: str
    lineage: tuple[str, ...] = ()
    model: Any = dataclasses.field(default=None, compare=False, repr=False)
    path: Path | None = None
    # the kernels an INT8 model is packed or lowered for: a torch quantized engine (x86, fbgemm, qnnpack)
    # or an ExecuTorch backend (xnnpack); not a TensorRT engine
    quantized_engine: str | None = None
    # the torch engine the deployment CPU dispatches to, where it differs (x86 without VNNI: fbgemm); host
    # parity loads under it
    kernels: str | None = None
    # what a stateful TorchScript model's code assigns between calls, as saved (toolchain.core.state):
    # every run of it starts from there
    state: Any = dataclasses.field(default=None, compare=False, repr=False)
    # the in-memory PyTorch artifact an ONNX file was exported from: a quantization stage of the ONNX
    # file prepares its QAT twin from it (toolchain.qat)
    source: Any = dataclasses.field(default=None, compare=False, repr=False)

    def files(self) -> list[Path]:
        """The files that make up the artifact on disk (ONNX external data, OpenVINO's .bin included)."""
        if self.path is None:
            return []
        if self.path.suffix == ".xml":  # OpenVINO IR: the weights beside the graph, same stem
            return [self.path, self.path.with_suffix(".bin")]
        extra = self.path.with_name(self.path.name + ".data")
        return [self.path, extra] if extra.exists() else [self.path]

    @property
    def has_external_data(self) -> bool:
        """An ONNX file whose weights live in a `.data` file beside it."""
        return self.path is not None and self.path.suffix == ".onnx" and len(self.files()) > 1

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def fixed_batch(self) -> int | None:
        """The batch size an ONNX file's first batched input is fixed to; None where it is dynamic
        (or the artifact is not an ONNX file). A model traced at batch 1 whose sizes follow the batch
        is written with that batch fixed (see toolchain.stages.export_onnx)."""
        if self.kind is not Kind.ONNX or self.path is None:
            return None
        return onnx_fixed_batch(self.path)

    def timed_batches(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        """The batch sizes to time it at: ``sizes``, or the one its file is fixed to."""
        fixed = self.fixed_batch()
        return (fixed,) if fixed else tuple(sizes)

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the artifact's files, or of an in-memory model's code and weights."""
        if self.path is not None:
            return sha256_files(self.files())
        return hashlib.sha256(_model_bytes(self.model)).hexdigest()


def onnx_fixed_batch(path: Path) -> int | None:
    """The fixed first dimension of an ONNX model's first input of rank >= 1; None if it is symbolic."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    for i in graph.input:
        dims = i.type.tensor_type.shape.dim
        if i.name not in weights and len(dims) >= 1:
            return dims[0].dim_value if dims[0].HasField("dim_value") else None
    return None


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _model_bytes(model: Any) -> bytes:
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        structure, state = str(model.graph), model.state_dict
    elif isinstance(model, torch.jit.ScriptModule):
        # The saved archive (deterministic): a frozen module has no state_dict and prints the same
        # code whatever its weights, which are constants of its graph. Hashed by code and state,
        # two frozen models with other weights looked the same to the pipeline's cache.
        buf = io.BytesIO()
        torch.jit.save(model, buf)
        return buf.getvalue()
    elif isinstance(model, torch.fx.GraphModule):
        structure, state = model.code, model.state_dict()
    else:
        structure, state = repr(model), model.state_dict()
    buf = io.BytesIO()
    torch.save(dict(sorted(state.items())), buf)
    return structure.encode() + buf.getvalue()
