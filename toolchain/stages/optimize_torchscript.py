"""A TorchScript model as PyTorch's JIT runs it fastest on a CPU: frozen (weights and attributes
folded into the graph, except the attributes its code assigns) and ``optimize_for_inference``d
(Conv-BN folded, Conv/Linear fused with their activations, oneDNN layouts where they pay).

This is the FP32 artifact a scripted model gets when its code (control flow on Python ints, state
kept between calls) does not pass through ``torch.fx`` or ``torch.export`` to the other torch
artifacts. A model loaded any other way gets those instead: for it the stage does not apply.
"""

from __future__ import annotations

import dataclasses
import warnings

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import NotApplicable, StageError, reason
from toolchain.core.stage import Stage, StageResult, register_stage
from toolchain.core.state import SavedState


@register_stage
class OptimizeTorchScript(Stage):
    name = "optimize_torchscript"
    requires = ("torch",)
    transitions = {
        Kind.TORCHSCRIPT: Kind.TORCHSCRIPT,
        Kind.EAGER: Kind.TORCHSCRIPT,
        Kind.FX: Kind.TORCHSCRIPT,
        Kind.EXPORTED: Kind.TORCHSCRIPT,
    }

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        if artifact.kind is not Kind.TORCHSCRIPT:
            raise NotApplicable(
                "optimize_torchscript: for TorchScript models; this one gets the torch.fx / torch.export "
                "artifacts"
            )
        import torch

        model = artifact.model
        if artifact.state is not None:  # frozen from the state the model was saved with
            artifact.state.restore(model)
        nodes = _nodes(model)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                optimized = torch.jit.optimize_for_inference(torch.jit.freeze(model.eval()))
        except Exception as e:
            raise StageError(f"optimize_torchscript: {reason(e)}") from None
        state = SavedState.of(optimized) if artifact.state is not None else None
        facts = {
            "nodes_before": nodes,
            "nodes_after": _nodes(optimized),
            "state": list(state.names) if state else [],
        }
        return StageResult(dataclasses.replace(artifact, model=optimized, state=state), facts)


def _nodes(model) -> int:
    """Nodes of the forward graph with every call inlined: what the JIT interprets."""
    import torch

    graph = model.forward.graph.copy()
    torch._C._jit_pass_inline(graph)
    return sum(1 for _ in graph.nodes())
