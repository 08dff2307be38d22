"""Cross-layer equalization: move each channel's scale between two consecutive layers.

Real networks end up with channels whose ranges differ by orders of magnitude (training,
weight decay, a BatchNorm folded in). Where a layer's output channel ``c`` reaches the next
layer through operations that commute with a positive scale (ReLU, LeakyReLU, max pooling,
nothing at all), dividing channel ``c`` of the first layer (weights and bias) by ``s_c`` and
multiplying the next layer's input channel ``c`` by ``s_c`` computes the same function:
``relu(x / s) = relu(x) / s`` for ``s > 0``. Choosing ``s_c = sqrt(r1_c / r2_c)`` (``r1``: the
first layer's output-channel weight range, ``r2``: the second's input-channel range) gives both
the same range ``sqrt(r1_c r2_c)`` (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", 2019), and with it the activation between them: one INT8
scale for that activation then no longer rounds the small channels to zero.

Data-free on purpose. Measured on the tests' models, scales from activation ranges measured on
calibration inputs (SmoothQuant's rule, s = sqrt(a / r2)) did worse: a channel that calibration
never activates keeps its outlier scale and is rounded away on other inputs (outlier model: one
layer still had to go to float), and BatchNorm after ReLU as the first of a pair (its gain as
"weight") made that model worse either way (near-dead channels have huge gains and small outputs).

Two graph forms, one rule: ONNX (Conv / Gemm / MatMul with constant weights) for the ONNX
Runtime artifacts, and the fused FX module (Conv / Linear, plain or fused with ReLU) for the
torch quantized engine. Callers check the result is the same function in FP32
(:mod:`toolchain.passes.rescale`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np

# Between the two layers: element-wise operations that commute with a positive per-channel scale.
ONNX_PASS_THROUGH = ("Relu", "LeakyRelu", "MaxPool")
SWEEPS = 8  # chains (a -> b -> c) converge in a few sweeps (Nagel et al. iterate likewise); numpy-cheap
MAX_RELATIVE_ERROR = 1e-4  # FP32 outputs before/after: float rounding is ~1e-6, a wrong pair is >1e-2


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two layers whose shared channels are rescaled: ``first``'s output channel c is
    ``second``'s input channel c."""

    first: str
    second: str


def balance(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """The per-channel scales that give both layers the same range; 1 where either range is zero
    (a dead channel has nothing to balance) and limited to 1e-6..1e6 against overflow."""
    s = np.ones_like(r1, dtype=np.float64)
    live = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    s[live] = np.sqrt(r1[live].astype(np.float64) / r2[live].astype(np.float64))
    return np.clip(s, 1e-6, 1e6)


def input_channel_view(
    weight: np.ndarray, groups: int, input_axis: int
) -> Callable[[np.ndarray], np.ndarray]:
    """For a (grouped) convolution or a matrix, a function that multiplies input channel c by s[c].

    A grouped convolution's weight is (out, in / groups, k...): input channel c is column
    c % (in / groups) of the output channels in group c // (in / groups).
    """
    if groups == 1:
        shape = [1] * weight.ndim
        shape[input_axis] = weight.shape[input_axis]
        return lambda s: weight * s.reshape(shape).astype(weight.dtype)
    per_group_in, per_group_out = weight.shape[1], weight.shape[0] // groups

    def scaled(s: np.ndarray) -> np.ndarray:
        factors = s.reshape(groups, per_group_in)  # [group, column]
        full = np.repeat(factors, per_group_out, axis=0)  # [out channel, column]
        return weight * full.reshape(full.shape + (1,) * (weight.ndim - 2)).astype(weight.dtype)

    return scaled


def input_ranges(weight: np.ndarray, groups: int, input_axis: int) -> np.ndarray:
    """Max |w| per input channel of a (grouped) convolution or a matrix."""
    if groups == 1:
        axes = tuple(a for a in range(weight.ndim) if a != input_axis)
        return np.abs(weight).max(axis=axes)
    per_group_out = weight.shape[0] // groups
    w = np.abs(weight).reshape(groups, per_group_out, weight.shape[1], -1)
    return w.max(axis=(1, 3)).reshape(-1)


def output_ranges(weight: np.ndarray, output_axis: int) -> np.ndarray:
    axes = tuple(a for a in range(weight.ndim) if a != output_axis)
    return np.abs(weight).max(axis=axes)


def check_same(
    before: Callable[[np.ndarray], list[np.ndarray]],
    after: Callable[[np.ndarray], list[np.ndarray]],
    inputs: np.ndarray,
) -> float:
    """The largest relative L2 difference between the two models' outputs on ``inputs``
    (0 for the same function; NaN or inf when the result is broken)."""
    worst = 0.0
    for a, b in zip(before(inputs), after(inputs), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if not np.isfinite(b).all():
            return float("inf")
        worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12)))
    return worst


# ---------------------------------------------------------------------------------------- ONNX


def equalize_onnx(model) -> list[Pair]:
    """Equalize every eligible pair of an ONNX model in place; returns the pairs."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    pairs = onnx_pairs(model)
    arrays = {name: numpy_helper.to_array(inits[name]) for p in pairs for name in _names(p)}
    for _ in range(SWEEPS):
        for first, second, _ in pairs:
            _balance_onnx(first, second, arrays)
    for name, array in arrays.items():
        inits[name].CopyFrom(
            numpy_helper.from_array(array.astype(numpy_helper.to_array(inits[name]).dtype), name)
        )
    return [Pair(first.node.name, second.node.name) for first, second, _ in pairs]


def onnx_pairs(model) -> list[tuple]:
    """The eligible pairs of an ONNX model: (first layer, second layer, the tensor between them)."""
    inits, uses, consumers, outputs = graph_index(model.graph)
    return [p for p in (_onnx_pair(n, consumers, inits, uses, outputs) for n in model.graph.node) if p]


def graph_index(graph) -> tuple[dict, dict[str, int], dict[str, list], set[str]]:
    """An ONNX graph's initializers by name, how often each tensor is read, its
    readers, and the graph's outputs."""
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
            consumers.setdefault(name, []).append(node)
    return inits, uses, consumers, {o.name for o in graph.output}


@dataclasses.dataclass(frozen=True)
class _Layer:
    node: object
    weight: str
    bias: str | None
    output_axis: int  # of the weight: the layer's output channels
    input_axis: int  # of the weight: the layer's input channels
    groups: int


def onnx_layer(node, inits, uses) -> _Layer | None:
    """A Conv / Gemm / MatMul whose weight (and bias) are constants of its own."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Conv" and len(node.input) >= 2:
        groups = attrs["group"].i if "group" in attrs else 1
        weight, bias, out_axis, in_axis = (
            node.input[1],
            (node.input[2] if len(node.input) > 2 and node.input[2] else None),
            0,
            1,
        )
    elif node.op_type == "Gemm" and len(node.input) >= 2:
        if attrs.get("transA") and attrs["transA"].i:
            return None
        trans_b = bool(attrs["transB"].i) if "transB" in attrs else False
        groups = 1
        weight, bias = node.input[1], (node.input[2] if len(node.input) > 2 and node.input[2] else None)
        out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    elif node.op_type == "MatMul" and len(node.input) == 2:
        groups, weight, bias, out_axis, in_axis = 1, node.input[1], None, 1, 0
    else:
        return None
    if (
        weight not in inits
        or uses.get(weight) != 1
        or (bias is not None and (bias not in inits or uses.get(bias) != 1))
    ):
        return None
    dims = list(inits[weight].dims)
    if node.op_type in ("Gemm", "MatMul") and len(dims) != 2:
        return None
    if bias is not None and list(inits[bias].dims) != [dims[out_axis]]:
        return None  # a broadcast bias (Gemm's C of another shape) is not per output channel
    return _Layer(node, weight, bias, out_axis, in_axis, groups)


def _onnx_pair(node, consumers, inits, uses, outputs):
    first = onnx_layer(node, inits, uses)
    if first is None:
        return None
    tensor = node.output[0]
    while True:
        if tensor in outputs or len(consumers.get(tensor, [])) != 1:
            return None
        nxt = consumers[tensor][0]
        if nxt.op_type in ONNX_PASS_THROUGH and nxt.input[0] == tensor:
            tensor = nxt.output[0]
            continue
        break
    second = onnx_layer(nxt, inits, uses)
    if second is None or nxt.input[0] != tensor:
        return None
    spatial = {first.node.op_type == "Conv", second.node.op_type == "Conv"}
    if len(spatial) != 1:
        return None  # Conv -> Gemm goes through a Flatten: channels and positions mix
    w1, w2 = inits[first.weight].dims, inits[second.weight].dims
    channels = w1[first.output_axis]
    if second.groups == 1 and w2[second.input_axis] != channels:
        return None
    if second.groups > 1 and w2[1] * second.groups != channels:
        return None
    return first, second, tensor


def _names(pair) -> Iterable[str]:
    first, second, _ = pair
    return [n for n in (first.weight, first.bias, second.weight) if n]


def _balance_onnx(first: _Layer, second: _Layer, arrays: dict[str, np.ndarray]) -> None:
    w1, w2 = arrays[first.weight], arrays[second.weight]
    s = balance(output_ranges(w1, first.output_axis), input_ranges(w2, second.groups, second.input_axis))
    shape = [1] * w1.ndim
    shape[first.output_axis] = -1
    arrays[first.weight] = w1 / s.reshape(shape).astype(w1.dtype)
    if first.bias:
        arrays[first.bias] = arrays[first.bias] / s.astype(arrays[first.bias].dtype)
    arrays[second.weight] = input_channel_view(w2, second.groups, second.input_axis)(s)


# ------------------------------------------------------------------------------------- torch FX


def equalize_fx(gm) -> list[Pair]:
    """Equalize every eligible pair of a (fused) FX GraphModule in place; returns the pairs."""
    import torch

    pairs = fx_pairs(gm)
    with torch.no_grad():
        for _ in range(SWEEPS):
            for first, second in pairs:
                _balance_torch(
                    weighted_module(gm.get_submodule(first)), weighted_module(gm.get_submodule(second))
                )
    return [Pair(a, b) for a, b in pairs]


def weighted_module(module):
    """The Conv / Linear inside a module fused with its activation (or the module itself)."""
    from torch import nn

    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return module
    inner = module[0] if isinstance(module, nn.Sequential) and len(module) else None
    return inner if isinstance(inner, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) else None


def fx_pairs(gm) -> list[tuple[str, str]]:
    from torch import nn

    through_modules = (nn.ReLU, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
    through_functions = _fx_pass_through()
    outputs = {a for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes}
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or weighted_module(gm.get_submodule(node.target)) is None:
            continue
        current = node
        while len(current.users) == 1 and current not in outputs:
            (user,) = current.users
            passes = (
                (user.op == "call_module" and isinstance(gm.get_submodule(user.target), through_modules))
                or (user.op == "call_function" and user.target in through_functions)
                or (user.op == "call_method" and user.target in ("relu", "relu_"))
            )
            if passes and user.args and user.args[0] is current:
                current = user
                continue
            if (
                user.op == "call_module"
                and user.args
                and user.args[0] is current
                and _fits(gm, node.target, user.target)
            ):
                pairs.append((node.target, user.target))
            break
    return pairs


def _fx_pass_through() -> set:
    """Functions between two layers that commute with a positive per-channel scale."""
    import torch
    import torch.nn.functional as F

    return {torch.relu, F.relu, F.leaky_relu, F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d}


def _fits(gm, first: str, second: str) -> bool:
    from torch import nn

    a, b = weighted_module(gm.get_submodule(first)), weighted_module(gm.get_submodule(second))
    if b is None or isinstance(a, nn.Linear) != isinstance(b, nn.Linear):
        return False  # Conv -> Linear goes through a flatten: channels and positions mix
    channels = a.weight.shape[0]
    return b.weight.shape[1] * getattr(b, "groups", 1) == channels


def _balance_torch(first, second) -> None:
    w1 = first.weight.detach().cpu().numpy()
    w2 = second.weight.detach().cpu().numpy()
    groups = getattr(second, "groups", 1)
    s = balance(output_ranges(w1, 0), input_ranges(w2, groups, 1))
    shape = [-1] + [1] * (w1.ndim - 1)
    first.weight.copy_(_tensor(w1 / s.reshape(shape).astype(w1.dtype)))
    if first.bias is not None:
        first.bias.copy_(_tensor(first.bias.detach().cpu().numpy() / s.astype(w1.dtype)))
    second.weight.copy_(_tensor(input_channel_view(w2, groups, 1)(s)))


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(array))
