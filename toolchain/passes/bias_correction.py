"""Bias correction for a Q/DQ ONNX model, a torch FX INT8 model and a pt2e graph: shift each quantized layer's
bias by the mean error its quantization adds, measured on calibration inputs (empirical bias
correction, Nagel et al. 2019).

INT8 rounding of weights and activations is not zero-mean per output channel: a convolution's
output drifts by a constant per channel, and the drift adds up through the network. For every
Conv / Gemm whose bias is an int32 initializer behind a DequantizeLinear (how ONNX Runtime writes
Q/DQ biases), the FP32 model and the Q/DQ model are run on the same calibration inputs; the mean
difference of that layer's output per channel, divided by the bias scale, is added to the int32
bias. Layers are corrected one at a time in graph order, each measured after every layer before it
was corrected: an early layer's drift is carried downstream, so a later layer's error is only
known once the earlier ones are fixed. (Correcting every layer at once from one measurement, and
repeating that, fixes one more layer per pass: on a digits CNN trained on another CPU, two passes
left the last layer's error at 80 %.) One probe run per layer, on the calibration inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from toolchain.core.feed import torch_args


def correct_biases(fp32: Path, qdq: Path, run: Callable[[object], list[np.ndarray]]) -> dict:
    """Correct ``qdq`` in place against ``fp32`` (same node names). ``run(model)`` returns the
    outputs of a ModelProto on the calibration inputs. Returns the facts for the manifest."""
    import onnx
    from onnx import numpy_helper

    reference = onnx.load(str(fp32))
    model = onnx.load(str(qdq))
    layers = _biased_layers(model)
    by_name = {n.name: n for n in reference.graph.node}
    layers = [(node, bias, scale) for node, bias, scale in layers if node.name in by_name]
    if not layers:
        return {"layers": 0}
    expected = _channel_means(run(exposing(reference, [by_name[n.name].output[0] for n, _, _ in layers])))
    shifts = []
    # graph order: every layer upstream is corrected already
    for (node, bias, scale), want in zip(layers, expected):
        (have,) = _channel_means(run(exposing(model, [node.output[0]])))
        step = np.round((want - have) / scale).astype(np.int64)
        value = numpy_helper.to_array(bias).astype(np.int64) + step
        bias.CopyFrom(
            numpy_helper.from_array(np.clip(value, -(2**31), 2**31 - 1).astype(np.int32), bias.name)
        )
        shifts.append(float(np.abs(step * scale).mean()))
    onnx.save(model, str(qdq))
    return {"layers": len(layers), "mean_abs_shift": float(f"{np.mean(shifts):.4g}")}


def _biased_layers(model) -> list[tuple]:
    """(node, int32 bias initializer, per-channel bias scale) of each Conv / Gemm with a Q/DQ bias."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.name:
            continue
        dq = producer.get(node.input[2])
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or dq.input[0] not in inits
            or dq.input[1] not in inits
        ):
            continue
        bias = inits[dq.input[0]]
        if numpy_helper.to_array(bias).dtype != np.int32:
            continue
        found.append((node, bias, numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)))
    return found


def exposing(model, tensors: list[str]):
    """A copy of ``model`` whose outputs are ``tensors``."""
    import onnx
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    return probe


def _channel_means(values: list[np.ndarray]) -> list[np.ndarray]:
    """Mean per channel (axis 1: a convolution's channels, a Gemm's outputs)."""
    return [v.astype(np.float64).mean(axis=tuple(d for d in range(v.ndim) if d != 1)) for v in values]


FX_STEPS = 2


def correct_module_biases(reference, quantized, x: np.ndarray) -> dict:
    """The same correction for a torch FX model: ``quantized`` (convert_fx's GraphModule, changed
    in place) against ``reference`` (the calibrated, prepared model it was converted from: the
    same fused modules under the same names, computing in float). Each quantized Conv / Linear
    (fused with its activation or not) gets the per-channel mean difference of its output on
    ``x`` added to its float bias, which the quantized module rounds with its output scale. For a
    layer fused with a ReLU the difference is measured after the ReLU, where a shift of the bias
    moves the mean only on the inputs that pass it, so each layer is measured and corrected twice
    (``FX_STEPS``): on the digits CNN the four layers' mean errors fell to 8-52 % (the first
    ConvReLU the least), where one step left 15-58 %. Recovery keeps the fix only where it helps."""
    import copy

    import torch

    reference = copy.deepcopy(reference).eval()  # its observers would otherwise record these inputs too
    known, modules = dict(reference.named_modules()), dict(quantized.named_modules())
    called = dict.fromkeys(n.target for n in quantized.graph.nodes if n.op == "call_module")  # graph order
    layers = [
        (name, modules[name])
        for name in called
        if name in known
        and hasattr(modules[name], "set_weight_bias")
        and callable(getattr(modules[name], "bias", None))
    ]
    if not layers:
        return {"layers": 0}
    inputs = x  # numpy (or a Feed): each batch becomes the model's arguments
    expected = module_means(reference, [known[name] for name, _ in layers], inputs)
    shifts = []
    # graph order: every layer upstream is corrected already
    for (name, module), want in zip(layers, expected):
        total = 0.0
        for _ in range(FX_STEPS):
            (have,) = module_means(quantized, [module], inputs)
            delta = torch.from_numpy(want - have).float()
            bias = module.bias()
            module.set_weight_bias(module.weight(), delta if bias is None else bias + delta)
            total = total + delta
        shifts.append(float(torch.as_tensor(total).abs().mean()))
    return {"layers": len(layers), "steps": FX_STEPS, "mean_abs_shift": float(f"{np.mean(shifts):.4g}")}


def module_means(model, modules: list, x, batch: int = 32) -> list[np.ndarray]:
    """Per-channel means of these modules' outputs when ``model`` runs on ``x`` (in batches; only
    the sums are kept). A convolution's channels are axis 1, a Linear's its last axis."""
    import torch

    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}

    def hook(i, module, out):
        v = (out.dequantize() if out.is_quantized else out).detach().double()
        axis = v.ndim - 1 if "Linear" in type(module).__name__ else 1
        v = v.movedim(axis, 0).reshape(v.shape[axis], -1)
        sums[i] = sums.get(i, 0) + v.sum(1).numpy()
        counts[i] = counts.get(i, 0) + v.shape[1]

    hooks = [
        m.register_forward_hook(lambda module, _, out, i=i: hook(i, module, out))
        for i, m in enumerate(modules)
    ]
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch):
                model(*torch_args(x[start : start + batch]))
    finally:
        for h in hooks:
            h.remove()
    return [sums[i] / counts[i] for i in range(len(modules))]


def correct_graph_biases(reference, converted, x: np.ndarray, batch: int = 32) -> dict:
    """The same correction for a pt2e model (ExecuTorch's `pte_int8`): ``converted`` (convert_pt2e's
    GraphModule, changed in place) against ``reference`` (a copy of the calibrated, prepared module it
    was converted from: BatchNorm folded the same way, computing in float, the same node names).
    Each convolution / linear node whose bias is a float constant (XNNPACK's quantizer leaves biases
    float; the delegate rounds them to int32 at the product's scale) gets the per-channel mean
    difference of its output on ``x`` added to that bias, one layer at a time in graph order. The
    constant is replaced, not changed in place: it can be the exported program's own tensor, which
    recovery's other variants convert again."""
    import torch

    aten = torch.ops.aten
    layer_ops = (aten.conv1d, aten.conv2d, aten.conv3d, aten.linear)
    known = {n.name for n in reference.graph.nodes}
    layers = []
    for node in converted.graph.nodes:
        target = getattr(node.target, "overloadpacket", node.target)
        bias = (
            node.args[2]
            if node.op == "call_function" and target in layer_ops and len(node.args) > 2
            else None
        )
        if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" and node.name in known:
            layers.append((node.name, bias.target, target is aten.linear))
    if not layers:
        return {"layers": 0}
    inputs = x
    expected = node_means(reference, [(name, linear) for name, _, linear in layers], inputs, batch)
    shifts = []
    # graph order: every layer upstream is corrected already
    for (name, attr, linear), want in zip(layers, expected):
        (have,) = node_means(converted, [(name, linear)], inputs, batch)
        owner_path, _, leaf = attr.rpartition(".")
        owner = converted.get_submodule(owner_path) if owner_path else converted
        old = getattr(owner, leaf)
        new = old.detach() + torch.from_numpy(want - have).to(old.dtype)
        setattr(
            owner,
            leaf,
            torch.nn.Parameter(new, requires_grad=False) if isinstance(old, torch.nn.Parameter) else new,
        )
        shifts.append(float(np.abs(want - have).mean()))
    return {"layers": len(layers), "mean_abs_shift": float(f"{np.mean(shifts):.4g}")}


def node_means(gm, nodes: list[tuple[str, bool]], x, batch: int = 32) -> list[np.ndarray]:
    """Per-channel means of these graph nodes' outputs (name, is a linear: channels on the last axis,
    else axis 1) when ``gm`` runs on ``x`` in batches; only the sums are kept."""
    import torch

    wanted = dict(nodes)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    class Probe(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in wanted:
                v = out.detach().double()
                axis = v.ndim - 1 if wanted[n.name] else 1
                v = v.movedim(axis, 0).reshape(v.shape[axis], -1)
                sums[n.name] = sums.get(n.name, 0) + v.sum(1).numpy()
                counts[n.name] = counts.get(n.name, 0) + v.shape[1]
            return out

    with torch.no_grad():
        for start in range(0, len(x), batch):
            Probe(gm).run(*torch_args(x[start : start + batch]))
    return [sums[name] / counts[name] for name, _ in nodes]
