"""The passes ``optimize_for_mobile`` ran, applied one by one where this torch build has them.

``torch.utils.mobile_optimizer.optimize_for_mobile`` asserts that PyTorch was built with
XNNPACK and refuses to run on current wheels. Most of its passes do not need XNNPACK and
are still exposed one by one; this stage runs those, in ``optimize_for_mobile``'s order,
and records each pass it could not run with the reason (the report lists them), instead
of failing the build or silently doing less.
"""

from __future__ import annotations

import dataclasses
import warnings

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import reason
from toolchain.core.stage import Stage, StageResult, register_stage


@register_stage
class MobilePasses(Stage):
    name = "mobile_passes"
    requires = ("torch",)
    transitions = {Kind.TORCHSCRIPT: Kind.TORCHSCRIPT}
    report_facts = ("applied", "not_applied")

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import torch

        model = artifact.model if artifact.model is not None else torch.jit.load(str(artifact.path))
        before = _node_count(model)
        applied, not_applied = [], {}
        for name, run in _passes():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    model = run(model) or model
                    applied.append(name)
                except _Unavailable as e:
                    not_applied[name] = str(e)
                except RuntimeError as e:
                    not_applied[name] = _reason(e)
        facts = {
            "applied": applied,
            "not_applied": not_applied,
            "graph_nodes": {"before": before, "after": _node_count(model)},
        }
        return StageResult(dataclasses.replace(artifact, model=model, path=None), facts)


class _Unavailable(Exception):
    pass


def _passes():
    """(name, function) in optimize_for_mobile's order; a function returns a new module or None."""
    import torch

    def freeze(m):
        # Already-frozen modules (save_torchscript freezes) have no `training` attribute left.
        return torch.jit.freeze(m.eval()) if hasattr(m, "training") else None

    def conv_bn_fusion(m):
        return torch.jit._recursive.wrap_cpp_module(torch._C._jit_pass_fold_convbn(m._c))

    def remove_dropout(m):
        torch._C._jit_pass_remove_dropout(m._c)

    def insert_fold_prepack_ops(m):
        torch._C._jit_pass_insert_prepacked_ops(m._c)  # asserts XNNPACK before touching the graph
        torch._C._jit_pass_fuse_clamp_w_prepacked_linear_conv(m._c)
        torch._C._jit_pass_fold_prepacking_ops(m._c)

    def hoist_conv_packed_params(m):
        if not hasattr(torch._C, "_jit_pass_hoist_conv_packed_params"):
            raise _Unavailable("this torch build exposes no binding for it outside optimize_for_mobile")

    def fuse_add_relu(m):
        torch._C._jit_pass_fuse_add_relu(m.graph)
        torch._C._jit_pass_fuse_quantized_add_relu(m.graph)  # the INT8 form: quantized::add_relu

    def vulkan_automatic_gpu_transfer(m):
        raise _Unavailable("Vulkan backend only; the Snapdragon artifacts run on the CPU")

    return [
        ("freeze", freeze),
        ("conv_bn_fusion", conv_bn_fusion),
        ("remove_dropout", remove_dropout),
        ("insert_fold_prepack_ops", insert_fold_prepack_ops),
        ("hoist_conv_packed_params", hoist_conv_packed_params),
        ("fuse_add_relu", fuse_add_relu),
        ("vulkan_automatic_gpu_transfer", vulkan_automatic_gpu_transfer),
    ]


def _reason(e: RuntimeError) -> str:
    text = str(e)
    if "XNNPACK is not enabled" in text:
        return "needs XNNPACK, which this torch build was compiled without"
    return reason(e, last=True, limit=200)


def _node_count(model) -> int:
    return sum(1 for _ in model.graph.nodes())
