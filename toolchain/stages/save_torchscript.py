"""Write a PyTorch model as a frozen TorchScript file that loads without Python code."""

from __future__ import annotations

import dataclasses
import warnings

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.stage import Stage, StageResult, register_stage
from toolchain.core.state import SavedState


@register_stage
class SaveTorchScript(Stage):
    name = "save_torchscript"
    requires = ("torch",)
    transitions = {
        Kind.FX: Kind.TORCHSCRIPT,
        Kind.EAGER: Kind.TORCHSCRIPT,
        Kind.TORCHSCRIPT: Kind.TORCHSCRIPT,
    }

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import torch

        model, how = artifact.model, "as loaded"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if not isinstance(model, torch.jit.ScriptModule):
                model, how = _to_torchscript(model, ctx)
            if artifact.state is not None:  # written with the state the model was saved with
                artifact.state.restore(model)
            model = torch.jit.freeze(model.eval())
        path = ctx.workdir / f"{artifact.precision}-{artifact.sha256[:12]}.pt"
        torch.jit.save(model, str(path))
        state = SavedState.of(model) if artifact.state is not None else None
        return StageResult(
            dataclasses.replace(artifact, kind=Kind.TORCHSCRIPT, model=model, path=path, state=state),
            {"torchscript": how},
        )


def _to_torchscript(model, ctx: BuildContext):
    """Traced, which records the example's sizes as constants; checked at another batch size
    against the model, and scripted instead when the trace does not hold there (a transformer's
    or LSTM's reshapes and initial states follow the batch). Scripting keeps those sizes
    symbolic; tracing stays the default because it flattens the graph the kernels run."""
    import torch

    try:
        traced = torch.jit.trace(model, ctx.example())
    except Exception as e:
        traced, error = None, e
    if traced is not None and _holds(traced, model, ctx):
        return traced, "traced"
    if isinstance(model, torch.fx.GraphModule):
        try:
            return torch.jit.script(model), "scripted"
        except Exception:
            pass
    if traced is None:
        raise StageError(f"save_torchscript: tracing failed: {reason(error)}") from None
    return traced, "traced (batch fixed: it does not script)"


def _holds(traced, model, ctx: BuildContext) -> bool:
    """Whether the trace computes what the model does at a batch size other than the example's."""
    import torch

    from toolchain.core.feed import repeat_to, torch_args
    from toolchain.core.runner import flatten_outputs

    x = torch_args(repeat_to(ctx.calibration.x[:3], 3))  # 3 samples (repeated if fewer)
    try:
        got, want = flatten_outputs(traced(*x)), flatten_outputs(model(*x))
    except Exception:
        return False
    return len(got) == len(want) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-4, rtol=1e-3)
        for (_, a), (_, b) in zip(got, want)
    )
