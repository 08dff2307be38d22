"""Save a TorchScript model for PyTorch Mobile's lite interpreter (``.ptl``).

The lite interpreter is deprecated in favour of ExecuTorch; this artifact is for apps that
already ship the PyTorch Mobile runtime. Packed INT8 weights are stored for the engine
the model was quantized for (qnnpack on phones) and unpacked on load.
"""

from __future__ import annotations

import dataclasses
import warnings

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.stage import Stage, StageResult, register_stage


@register_stage
class SaveLite(Stage):
    name = "save_lite"
    requires = ("torch",)
    transitions = {Kind.TORCHSCRIPT: Kind.LITE}
    report_facts = ("latency_note",)

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import torch

        model = artifact.model if artifact.model is not None else torch.jit.load(str(artifact.path))
        path = ctx.workdir / f"{artifact.precision}-{artifact.sha256[:12]}.ptl"
        if artifact.quantized_engine:
            torch.backends.quantized.engine = artifact.quantized_engine
        if artifact.state is not None:  # written with the state the model was saved with
            artifact.state.restore(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model._save_for_lite_interpreter(str(path))
            except RuntimeError as e:
                raise StageError(f"{self.name}: {reason(e, last=True)}") from None
        facts = {}
        if artifact.state is not None:
            facts["latency_note"] = (
                "the model keeps state between calls and a lite-interpreter module cannot be given its saved "
                "state back: every check loads the file afresh, so this latency includes loading it"
            )
        return StageResult(dataclasses.replace(artifact, kind=Kind.LITE, model=None, path=path), facts)
