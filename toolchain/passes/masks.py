"""Additive attention masks under INT8.

A transformer that masks padding adds a large negative number (-1e4, or the dtype's minimum) to the
attention scores of padded positions before the Softmax. On calibration data that number is the
range of the tensor: an 8-bit scale covering [-10000, 10] has a step of about 40 and rounds every
real score to the same value, so attention becomes uniform. (The text classifier in tests/models.py:
ONNX Runtime static INT8 with every node quantized, SQNR 12.2 dB and 97.9 % top-1 agreement; with
the Add that applies the mask and its Softmax kept in float, 41.6 dB and 100 %.)

The fix finds each Softmax whose input falls below :data:`MASK_FLOOR` on the calibration inputs,
which only a mask does (exp underflows to 0 in FP32 near -104: no learned score goes there), and
keeps it and the node that produced its input (the mask's Add) out of INT8. Weights stay INT8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MASK_FLOOR = -1e3


def onnx_mask_nodes(path: Path, runner, x) -> list[str]:
    """Names of every Softmax of the ONNX model at ``path`` whose input reaches below MASK_FLOOR when
    the model runs on ``x`` (``runner(model) -> run(x) -> outputs``), each followed by the name of
    the node that computes that input."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax" and n.name]
    if not softmaxes:
        return []
    producer = {o: n for n in model.graph.node for o in n.output}
    probed = onnx.load(str(path))
    known = {o.name for o in probed.graph.output}
    scores = [s.input[0] for s in softmaxes]
    probed.graph.output.extend(
        helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in scores if t not in known
    )
    outputs = runner(probed)(x)
    names = [o.name for o in probed.graph.output]
    found = []
    for softmax, tensor in zip(softmaxes, scores):
        if float(np.min(outputs[names.index(tensor)])) < MASK_FLOOR:
            found.append(softmax.name)
            if tensor in producer and producer[tensor].name:
                found.append(producer[tensor].name)
    return found


def fx_mask_nodes(gm, x, limit: int = 64) -> list:
    """The nodes of an FX GraphModule (torch.fx or an exported program's module) that compute the
    input of a Softmax and reach below MASK_FLOOR when ``gm`` runs on ``x[:limit]`` (the mask's add)."""
    import torch

    from toolchain.core.feed import torch_args

    def is_softmax(node) -> bool:
        return node.op in ("call_function", "call_method") and "softmax" in str(
            getattr(node.target, "__name__", node.target)
        )

    probes = {n.args[0] for n in gm.graph.nodes if is_softmax(n) and isinstance(n.args[0], torch.fx.Node)}
    if not probes:
        return []
    low: dict = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in probes and isinstance(out, torch.Tensor):
                low[n] = min(low.get(n, float("inf")), float(out.min()))
            return out

    with torch.no_grad():
        Probe(gm).run(*torch_args(x[:limit]))
    return [n for n in gm.graph.nodes if n in probes and low.get(n, 0.0) < MASK_FLOOR]


def fx_call_orders(gm, nodes) -> list[tuple]:
    """(callable, index among that callable's calls in graph order) of each node: how torch.ao's
    QConfigMapping.set_module_name_object_type_order names a function call in the root module."""
    calls: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            calls.setdefault(n.target, []).append(n)
    return [(n.target, calls[n.target].index(n)) for n in nodes if n.op == "call_function"]
