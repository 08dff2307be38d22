"""Write a PyTorch model as a frozen TorchScript file that loads without Python code."""

from __future__ import annotations

import dataclasses
import warnings

from ..artifact import Artifact, Kind
from ..context import BuildContext
from ..errors import StageError, reason
from ..stage import Stage, StageResult, register_stage


@register_stage
class SaveTorchScript(Stage):
    name = "save_torchscript"
    requires = ("torch",)
    transitions = {Kind.FX: Kind.TORCHSCRIPT, Kind.EAGER: Kind.TORCHSCRIPT, Kind.TORCHSCRIPT: Kind.TORCHSCRIPT}

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import torch

        model = artifact.model
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if not isinstance(model, torch.jit.ScriptModule):
                try:
                    model = torch.jit.trace(model, ctx.example())
                except Exception as e:
                    raise StageError(f"save_torchscript: tracing failed: {reason(e)}") from None
            model = torch.jit.freeze(model.eval())
        path = ctx.workdir / f"{artifact.precision}-{artifact.sha256[:12]}.pt"
        torch.jit.save(model, str(path))
        return StageResult(dataclasses.replace(artifact, kind=Kind.TORCHSCRIPT, model=model, path=path))
