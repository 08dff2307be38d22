"""Where FP16 cannot hold a model's values, and keeping those layers in FP32.

FP16's largest finite value is 65504. A softmax-kernel (Performer) attention sums exp() features
over tokens, a norm's variance squares activations: FP32 holds those intermediate values, FP16
turns them into inf and every output after them into NaN. This pass measures the FP32 model's
values on the calibration inputs (every node's output, per graph) and names the nodes that must
compute in FP32: every node whose output or any input exceeds the range. A region of them then
runs in FP32 from the first value out of range to the last, with casts only where it meets FP16.

Two graphs: an FX GraphModule (the torch.export program the ExecuTorch and TorchScript FP16/BF16
artifacts are cast from) and an ONNX model (the FP16 ONNX artifact).
"""

from __future__ import annotations

import copy
import operator
from typing import Iterable

from toolchain.passes.int8_graph import module_macs

FP16_MAX = 65504.0
# calibration inputs the FP32 ranges are measured on: enough for the largest activations of real data
RANGE_SAMPLES = 64


# ---- FX --------------------------------------------------------------------------------------------


def fx_compute_nodes(gm) -> list[str]:
    """Names of the nodes that compute (calls), not the ones that pick a tuple's element."""
    return [
        n.name
        for n in gm.graph.nodes
        if n.op in ("call_function", "call_method", "call_module") and n.target is not operator.getitem
    ]


def fx_ranges(gm, batches: Iterable[tuple]) -> tuple[dict[str, float], dict[str, int]]:
    """Per node: the largest magnitude of its floating outputs over ``batches`` (inf and NaN kept as
    inf), and its multiply-accumulates per sample (Linear, Conv, matmul), from one FP32 run each."""
    import torch

    largest: dict[str, float] = {}
    macs: dict[str, int] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values = [
                t
                for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()
            ]
            if values:
                top = max(float(t.detach().abs().max()) for t in values)
                top = top if top == top else float("inf")  # NaN: out of any range
                largest[n.name] = max(largest.get(n.name, 0.0), top)
            if n.name not in macs and isinstance(out, torch.Tensor) and out.dim():
                macs[n.name] = _fx_macs(self.module, n, out, self.fetch_args_kwargs_from_env(n)[0])
            return out

    with torch.no_grad():
        for args in batches:
            Recorder(gm).run(*args)
    return largest, macs


def _fx_macs(gm, node, out, args: tuple) -> int:
    """Multiply-accumulates per sample of a node: a module's as :func:`module_macs` counts them (Linear,
    Conv, LSTM/GRU), a matmul's by its contracted dimension, 0 for anything else."""
    import torch

    if node.op == "call_module":
        return module_macs(gm.get_submodule(node.target), args, out)
    name = str(getattr(node.target, "__name__", node.target)).split(".")[0]
    if name in ("matmul", "bmm", "mm", "linear") and args and isinstance(args[0], torch.Tensor):
        return out.numel() // max(1, out.shape[0]) * int(args[0].shape[-1])
    return 0


def fx_overflowing(gm, largest: dict[str, float], limit: float = FP16_MAX) -> list[str]:
    """The compute nodes whose output or any input exceeds ``limit`` in FP32 (graph order)."""
    beyond = {name for name, top in largest.items() if not top <= limit}
    computing = set(fx_compute_nodes(gm))
    out = []
    for n in gm.graph.nodes:
        if n.name not in computing:
            continue
        sources = {a.name for a in n.all_input_nodes}
        # a tuple's element is out of range where the tuple is
        sources |= {a.args[0].name for a in n.all_input_nodes if a.target is operator.getitem}
        if n.name in beyond or sources & beyond:
            out.append(n.name)
    return out


def fx_keep_float32(gm, dtype, keep: Iterable[str]):
    """``gm`` (cast to ``dtype``, its inputs cast by a `to` node) with the nodes ``keep`` computing
    in FP32: their floating arguments cast up, and what they hand an FP16 node cast down, once each.
    Modules a kept node calls are copied in FP32 (the FP16 copy stays for the other callers)."""
    import torch

    keep = set(keep)
    graph = gm.graph
    precision: dict = {}
    casts: dict = {}

    def floating(value) -> bool:
        meta = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
        return isinstance(value, torch.fx.Node) and (
            meta is None or getattr(getattr(meta, "dtype", None), "is_floating_point", False)
        )

    def cast(value, want, before):
        if (value, want) not in casts:
            with graph.inserting_before(before):
                casts[(value, want)] = graph.call_method("to", (value, want))
            precision[casts[(value, want)]] = want
        return casts[(value, want)]

    for node in list(graph.nodes):
        if node in precision or node.op == "output":
            continue
        if node.op == "placeholder":
            precision[node] = torch.float32
            continue
        if node.op == "get_attr":
            precision[node] = dtype
            continue
        if node.target is operator.getitem:
            precision[node] = precision.get(node.args[0], dtype)
            continue
        if node.op == "call_method" and node.target == "to" and isinstance(node.args[-1], torch.dtype):
            precision[node] = node.args[-1]  # a cast already (the inputs' and outputs')
            continue
        want = torch.float32 if node.name in keep else dtype
        if node.op == "call_module" and node.name in keep:
            name = f"{node.target.replace('.', '_')}_fp32"
            if not hasattr(gm, name):
                gm.add_submodule(name, copy.deepcopy(gm.get_submodule(node.target)).float())
            node.target = name

        def matched(a, want=want, node=node):
            if floating(a) and precision.get(a, dtype) != want:
                return cast(a, want, node)
            return a

        node.args = torch.fx.node.map_arg(node.args, matched)
        node.kwargs = torch.fx.node.map_arg(node.kwargs, matched)
        precision[node] = want
    graph.lint()
    gm.recompile()
    return gm


# ---- ONNX ------------------------------------------------------------------------------------------


def onnx_ranges(model, feeds: Iterable[dict]) -> dict[str, float]:
    """The largest magnitude of every FP32 value the model computes over ``feeds``, by value name,
    from ONNX Runtime with each value made an output."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(probe)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    }
    present = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in present and types.get(name) == onnx.TensorProto.FLOAT:
                probe.graph.output.append(
                    onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                )
                present.add(name)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    largest: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(None, feed)):
            if value.size and np.issubdtype(value.dtype, np.floating):
                top = float(np.max(np.abs(value)))
                largest[name] = max(largest.get(name, 0.0), top if top == top else float("inf"))
    return largest


def onnx_overflowing(model, largest: dict[str, float], limit: float = FP16_MAX) -> list[str]:
    """Names of the nodes with a floating output whose output or any input exceeds ``limit`` in FP32
    (graph order); a node that computes sizes or indices from such a value (Shape, ArgMax) has
    nothing to keep in FP32."""
    beyond = {name for name, top in largest.items() if not top <= limit}
    return [
        n.name
        for n in model.graph.node
        if n.name and beyond & {*n.input, *n.output} and any(o in largest for o in n.output)
    ]


def drop_cast_round_trips(model, before: set[str]) -> int:
    """Casts FP32 -> FP16 -> FP32 that a converter put between two FP32 nodes (not among the node
    names ``before`` the conversion): the consumer reads the FP32 value, which FP16 could not hold.
    Returns how many were dropped."""
    import onnx

    graph = model.graph
    made = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and n.name not in before}
    rename: dict[str, str] = {}
    dropped: set[str] = set()
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        down = made.get(node.input[0]) if node.op_type == "Cast" and node.name not in before else None
        if down is None or _to(node) != onnx.TensorProto.FLOAT or _to(down) != onnx.TensorProto.FLOAT16:
            continue
        if node.output[0] in outputs:  # the graph's output keeps its name: left as it is
            continue
        rename[node.output[0]] = down.input[0]
        dropped.add(node.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept = [n for n in graph.node if n.name not in dropped]
    used = {i for n in kept for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in kept if not (n.name not in before and n.op_type == "Cast" and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(kept)
    return len(dropped)


def _to(node) -> int:
    return next(a.i for a in node.attribute if a.name == "to")
