"""Lower an exported program to an ExecuTorch ``.pte``, delegating what XNNPACK can run.

``to_edge_transform_and_lower`` checks the graph against the Core ATen opset, hands every
subgraph the XNNPACK partitioner accepts to the delegate (INT8 where the graph carries
pt2e quantize/dequantize pairs, FP32 otherwise) and leaves the rest to ExecuTorch's
portable kernels. Two ways a model can fail to lower, both reported naming the operator:
an operator outside the Core ATen opset (no edge dialect for it), and an operator left
outside the delegate for which the ExecuTorch runtime has no kernel.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Literal

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.export import as_module, export_program
from toolchain.core.options import option
from toolchain.core.stage import Stage, StageResult, register_stage

_NOT_CORE = re.compile(r"Operator (?:torch\._ops\.)?(\S+) is not in Core ATen opset")
_MISSING_OUT = re.compile(r"Missing out variants: \{'?([^'}]+)")
_IN_OPERATOR = re.compile(r"in operator (\S+?):? ")
_CHECK_FAILED = re.compile(r"Check failed \(.*?\): (.+)$")


@dataclasses.dataclass(frozen=True)
class LowerExecuTorchOptions:
    backend: Literal["xnnpack", "portable"] = option(
        "xnnpack", "delegate to XNNPACK, or run everything on portable kernels"
    )


@register_stage
class LowerExecuTorch(Stage):
    name = "lower_executorch"
    requires = ("torch", "executorch")
    transitions = {Kind.EAGER: Kind.EXECUTORCH, Kind.FX: Kind.EXECUTORCH, Kind.EXPORTED: Kind.EXECUTORCH}
    Options = LowerExecuTorchOptions
    report_facts = ("delegate_calls", "outside_delegate")

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        from executorch.exir import to_edge_transform_and_lower

        # The .pte is planned for the batch-1 input: memory for every tensor is laid out
        # ahead of time, the way the phone runs it (the runner feeds larger batches one by one).
        program = export_program(as_module(artifact), ctx.example(), self.name)
        partitioners = []
        if self.options.backend == "xnnpack":
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

            partitioners = [XnnpackPartitioner()]
        try:
            edge = to_edge_transform_and_lower(program, partitioner=partitioners)
            outside = _ops(edge.exported_program().graph)
            delegate_calls = outside.pop("executorch_call_delegate", 0)
            executorch = edge.to_executorch()
        except Exception as e:
            raise StageError(_explain(e)) from None
        missing = _missing_kernels(executorch)
        if missing:
            raise StageError(
                f"{self.name}: ExecuTorch cannot run operator {', '.join(missing)}: it is not delegated to "
                f"{self.options.backend} and this ExecuTorch runtime has no kernel for it"
            )
        path = ctx.workdir / f"{artifact.precision}-{artifact.sha256[:12]}.pte"
        path.write_bytes(executorch.buffer)
        smoke_run(path, ctx.example())
        facts = {
            "backend": self.options.backend,
            "input_shape": list(ctx.input_shape),
            "delegate_calls": delegate_calls,
            "outside_delegate": dict(sorted(outside.items())),
        }
        return StageResult(
            dataclasses.replace(
                artifact, kind=Kind.EXECUTORCH, model=None, path=path, quantized_engine=self.options.backend
            ),
            facts,
        )


def _ops(graph) -> dict[str, int]:
    """Calls by target name: delegate calls (``executorch_call_delegate``) and the operators
    run outside any delegate (``aten.convolution.default``)."""
    names = collections.Counter()
    for node in graph.nodes:
        name = getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else ""
        if name and name != "getitem":  # unpacks a delegate's outputs: no work of its own
            names[name] += 1
    return dict(names)


def smoke_run(path, example) -> None:
    """Run the program once: a portable kernel may exist and still refuse this model's
    arguments (a 5-D convolution), which only shows at run time, in the runtime's log."""
    from executorch.runtime import Runtime

    from toolchain.core.native import native_stderr

    with native_stderr() as log:
        try:
            Runtime.get().load_program(path).load_method("forward").execute(list(example))
            return
        except RuntimeError as e:
            error = str(e)
    op = next((m.group(1) for m in map(_IN_OPERATOR.search, log) if m), None)
    why = next(
        (m.group(1).strip() for m in map(_CHECK_FAILED.search, log) if m and m.group(1).strip()), error
    )
    subject = f"operator {op}" if op else "this program"
    raise StageError(f"lower_executorch: ExecuTorch cannot run {subject} on this model: {why[:200]}")


def _missing_kernels(executorch) -> list[str]:
    from executorch.runtime import Runtime

    known = Runtime.get().operator_registry.operator_names
    missing = []
    for plan in executorch.executorch_program.execution_plan:
        for op in plan.operators:
            full = f"{op.name}.{op.overload}" if op.overload else op.name
            if full not in known and op.name not in known:
                missing.append(full)
    return sorted(set(missing))


def _explain(e: Exception) -> str:
    text = str(e)
    match = _NOT_CORE.search(text)
    if match:
        return (
            f"lower_executorch: ExecuTorch cannot lower operator {match.group(1)}: it is not in the "
            f"Core ATen opset, so neither XNNPACK nor the portable kernels take it"
        )
    match = _MISSING_OUT.search(text)
    if match:
        return (
            f"lower_executorch: ExecuTorch cannot lower operator {match.group(1)}: the delegate did not take "
            "it and ExecuTorch has no out-variant kernel for it"
        )
    return f"lower_executorch: ExecuTorch lowering failed ({type(e).__name__}): {reason(e)}"
