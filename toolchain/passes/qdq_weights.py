"""Q/DQ weights a PyTorch export leaves behind a Transpose: folded into the stored weights.

The dynamo exporter writes a Linear on a rank-3 input (a transformer's, a sequence model's) as
``Transpose(W) -> MatMul``; in a converted QAT model ``W`` is ``DequantizeLinear(int8 initializer)``,
which no exporter pass folds, so the graph reads ``DequantizeLinear -> Transpose -> MatMul``. Runtimes
that fuse Q/DQ look for a DequantizeLinear right before the MatMul (and so does the toolchain's
INT8 share), as ONNX Runtime's own quantizer writes it. The transpose is applied to the int8 data
instead, and the per-channel axis follows it: the same function.
"""

from __future__ import annotations

import numpy as np


def fold_weight_transposes(proto) -> int:
    """Fold every ``Transpose`` fed by a ``DequantizeLinear`` of initializers (and read by nothing
    else) into that initializer, in place; returns how many were folded."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    made_by = {o: n for n in graph.node for o in n.output}
    folded = []
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in made_by:
            continue
        dq = made_by[node.input[0]]
        if (
            dq.op_type != "DequantizeLinear"
            or not all(i in inits for i in dq.input if i)
            or readers.get(dq.output[0]) != 1
            or readers.get(dq.input[0]) != 1
            or dq.output[0] in outputs
        ):
            continue
        weight = numpy_helper.to_array(inits[dq.input[0]])
        perm = next(
            (list(a.ints) for a in node.attribute if a.name == "perm"), list(range(weight.ndim))[::-1]
        )
        axis_attr = next((a for a in dq.attribute if a.name == "axis"), None)
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.size > 1:  # per channel: the channel axis moves with the transpose
            axis = (axis_attr.i if axis_attr else 1) % weight.ndim
            if axis_attr:
                dq.attribute.remove(axis_attr)
            dq.attribute.append(helper.make_attribute("axis", perm.index(axis)))
        inits[dq.input[0]].CopyFrom(
            numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), dq.input[0])
        )
        for reader in graph.node:  # what read the transpose reads the DequantizeLinear now
            for i, name in enumerate(reader.input):
                if name == node.output[0]:
                    reader.input[i] = dq.output[0]
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    # the shapes the exporter recorded for the weights and their DequantizeLinear are the untransposed ones
    stale = {
        name
        for n in folded
        for name in (n.output[0], *made_by[n.input[0]].input, *made_by[n.input[0]].output)
    }
    for info in [v for v in graph.value_info if v.name in stale]:
        graph.value_info.remove(info)
    return len(folded)
