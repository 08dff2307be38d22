"""Lift an exported (aten-level) graph back to module form.

``ExportedProgram.module()`` calls ``aten.conv2d(x, weight, bias, ...)`` on parameters;
FX graph-mode fusion and quantization match *modules* (``nn.Conv2d`` followed by
``nn.BatchNorm2d``) and torch functionals. This pass rebuilds those modules from the
parameters and maps aten calls onto the equivalent functionals, so a `.pt2` model goes
through the same fusion and quantization as an eager one. Ops without a mapping stay as
they are and simply run in FP32.

So that FX can re-trace the graph (fusion and quantization do) and TorchScript can script it:
symbolic sizes become ``x.size(d)``, factories sized from the input become tensor methods,
`aten.lstm` / `aten.gru` become nn.LSTM / nn.GRU modules (which dynamic quantization swaps),
other aten overloads their packets, and the pytree wrapper of a plain signature is dropped.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

_FUNCTIONALS: dict[Any, Callable] = {
    aten.add.Tensor: torch.add,
    aten.add_.Tensor: torch.add,
    aten.mul.Tensor: torch.mul,
    aten.cat.default: torch.cat,
    aten.flatten.using_ints: torch.flatten,
    aten.mean.dim: torch.mean,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.max_pool2d.default: F.max_pool2d,
    aten.hardswish.default: F.hardswish,
    aten.hardswish_.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid,
    aten.hardtanh.default: F.hardtanh,
    aten.hardtanh_.default: F.hardtanh,
    aten.sigmoid.default: torch.sigmoid,
    aten.silu.default: F.silu,
    aten.silu_.default: F.silu,
    aten.dropout.default: lambda x, p, train: x,
}
_RELU = {aten.relu.default, aten.relu_.default}
_CONV = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d}
_BATCH_NORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def lift_exported(ep: "torch.export.ExportedProgram") -> tuple[torch.fx.GraphModule, int]:
    """Return the module-form GraphModule and how many calls were lifted to modules."""
    gm = ep.module()
    ranks = {n.name: len(n.meta["val"].shape) for n in ep.graph.nodes if hasattr(n.meta.get("val"), "shape")}
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        module = _module_for(gm, node, ranks)
        if module is not None:
            name = _unique_name(gm, _owner(node))
            gm.add_submodule(name, module)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(
                    name, module.call_args(node) if isinstance(module, Recurrent) else (node.args[0],)
                )
            if node.name in ranks:
                ranks[new.name] = ranks[node.name]
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            lifted += 1
        elif node.target in _FUNCTIONALS:
            node.target = _FUNCTIONALS[node.target]
        elif node.target is aten.sym_size.int:
            # `x.size(d)`, which FX quantization knows yields an int: it would put an observer on a
            # symbolic size
            node.op, node.target = "call_method", "size"
        elif node.target in _FACTORIES and _size_from_graph(node) and _as_tensor_method(node):
            pass
        elif isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten":
            # the op's packet (`aten.view`, not `aten.view.default`): the same call, and one that
            # TorchScript can compile, so the quantized model can be scripted rather than traced
            node.target = node.target.overloadpacket
    gm.graph.eliminate_dead_code()
    _plain_signature(gm)
    # a plain GraphModule: the exported one refuses .eval(), which fusion needs
    plain = torch.fx.GraphModule(gm, gm.graph).eval()
    plain.delete_all_unused_submodules()
    plain.recompile()
    return plain, lifted


_FACTORIES = {
    aten.zeros.default: "new_zeros",
    aten.ones.default: "new_ones",
    aten.empty.memory_format: "new_empty",
    aten.full.default: "new_full",
}


def _size_from_graph(node: torch.fx.Node) -> bool:
    return isinstance(node.args[0], (list, tuple)) and any(isinstance(d, torch.fx.Node) for d in node.args[0])


def _as_tensor_method(node: torch.fx.Node) -> bool:
    """`aten.zeros([2, x.size(0), 32])` -> `x.new_zeros([2, x.size(0), 32])` (device kept).

    A factory whose size comes from the input (an LSTM's initial state) takes no tensor, so FX
    tracing, which fusion and quantization redo, calls it with a proxy inside the size list and
    fails ("aten::zeros() Expected a value of type 'List[int]'"); a method of a tensor the
    size was read from is traced like any other call, and scripts. False (node unchanged) when
    no such tensor is found."""
    source = next(d for d in node.args[0] if isinstance(d, torch.fx.Node))
    while source.op != "placeholder" and not (source.op == "call_method" and source.target == "size"):
        source = next((a for a in source.args if isinstance(a, torch.fx.Node)), None)
        if source is None:
            return False
    tensor = source.args[0] if source.op == "call_method" else source
    value = tensor.meta.get("val")
    floating = getattr(value, "dtype", None) is not None and value.dtype.is_floating_point
    # float32 from a float input is left to the tensor's own type, so a model cast to BF16 / FP16
    # builds its states in that type; any other dtype (or an integer input's) is kept
    kwargs = {
        k: v
        for k, v in node.kwargs.items()
        if k in ("dtype", "device", "pin_memory") and not (k == "dtype" and v == torch.float32 and floating)
    }
    node.op, node.target = "call_method", _FACTORIES[node.target]
    node.args, node.kwargs = (tensor, *node.args), kwargs
    return True


def _plain_signature(gm: torch.fx.GraphModule) -> None:
    """Drop the pytree (un)flattening ``ExportedProgram.module()`` wraps around the graph when
    the inputs are positional tensors and the output one tensor or a tuple of them: the same
    function, which TorchScript can then script (it cannot compile the pytree helpers), so
    sizes read from the input stay symbolic. Nested outputs keep their codegen."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None or info.out_spec is None:
        return
    args, kwargs = (
        info.in_spec.children()
        if info.in_spec.type is tuple and info.in_spec.num_children == 2
        else (None, None)
    )
    if args is None or kwargs.num_children or not all(c.is_leaf() for c in args.children()):
        return
    out = info.out_spec
    single = out.is_leaf()
    if not single and not (out.type is tuple and all(c.is_leaf() for c in out.children())):
        return
    node = next(n for n in gm.graph.nodes if n.op == "output")
    flat = list(node.args[0]) if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
    node.args = (flat[0] if single else tuple(flat),)
    gm.graph._codegen = torch.fx.graph.CodeGen()


class Recurrent(nn.Module):
    """An LSTM or GRU lifted from `aten.lstm` / `aten.gru`, called as the aten op is: (input, h0[, c0])
    -> (output, h[, c]). The nn.LSTM / nn.GRU inside is what dynamic quantization swaps."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    @staticmethod
    def call_args(node: torch.fx.Node) -> tuple:
        hx = node.args[1]
        return (node.args[0], *hx) if isinstance(hx, (list, tuple)) else (node.args[0], hx)


class LiftedLSTM(Recurrent):
    def forward(self, x, h0, c0):
        result = self.rnn(x, (h0, c0))
        return result[0], result[1][0], result[1][1]


class LiftedGRU(Recurrent):
    def forward(self, x, h0):
        result = self.rnn(x, h0)
        return result[0], result[1]


_RNN = {aten.lstm.input: (nn.LSTM, LiftedLSTM), aten.gru.input: (nn.GRU, LiftedGRU)}


def _recurrent(classes: tuple[type, type], gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    """`aten.lstm(x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)`."""
    _, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first = node.args
    weights = [_attr(gm, p) for p in params]
    if train or not all(isinstance(w, torch.Tensor) for w in weights):
        return None
    per_direction = 4 if has_biases else 2
    if len(weights) != per_direction * layers * (2 if bidirectional else 1):
        return None  # projections (proj_size) add weights this does not map
    w_ih, w_hh = weights[0], weights[1]
    cls, lifted = classes
    rnn = cls(
        w_ih.shape[1],
        w_hh.shape[1],
        layers,
        bias=has_biases,
        batch_first=batch_first,
        bidirectional=bidirectional,
    )
    with torch.no_grad():
        for name, w in zip(rnn._flat_weights_names, weights):
            getattr(rnn, name).copy_(w)
    return lifted(rnn).eval()


def _module_for(gm: torch.fx.GraphModule, node: torch.fx.Node, ranks: dict[str, int]) -> nn.Module | None:
    if node.target in _RELU:
        return nn.ReLU()
    if node.target in _RNN:
        return _recurrent(_RNN[node.target], gm, node)
    params = [_attr(gm, a) for a in node.args[1:]]
    if node.target in _CONV:
        return _conv(_CONV[node.target], params, node.args)
    if node.target is aten.linear.default and params and isinstance(params[0], torch.Tensor):
        weight, bias = params[0], (params[1] if len(params) > 1 else None)
        mod = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        return _load(mod, weight, bias)
    rank = ranks.get(getattr(node.args[0], "name", None)) if node.args else None
    if (
        node.target is aten.batch_norm.default
        and rank in _BATCH_NORM
        and len(params) >= 4
        and node.args[5] is False
    ):
        weight, bias, mean, var = params[:4]
        if not all(isinstance(t, torch.Tensor) for t in (weight, bias, mean, var)):
            return None
        mod = _BATCH_NORM[rank](weight.shape[0], eps=node.args[7])
        mod.load_state_dict(
            {"weight": weight, "bias": bias, "running_mean": mean, "running_var": var}, strict=False
        )
        return mod.eval()
    return None


def _conv(cls: type, params: list, args: tuple) -> nn.Module | None:
    if not params or not isinstance(params[0], torch.Tensor):
        return None
    weight = params[0]
    bias = params[1] if len(params) > 1 and isinstance(params[1], torch.Tensor) else None
    stride, padding, dilation, groups = list(args[3:7]) + [1, 0, 1, 1][len(args[3:7]) :]
    if isinstance(padding, str):
        return None
    mod = cls(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias is not None,
    )
    return _load(mod, weight, bias)


def _load(mod: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    with torch.no_grad():
        mod.weight.copy_(weight)
        if bias is not None:
            mod.bias.copy_(bias)
    return mod.eval()


def _attr(gm: torch.fx.GraphModule, arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        return functools.reduce(getattr, arg.target.split("."), gm)
    return arg


def _owner(node: torch.fx.Node) -> str:
    """`layer1.0.conv1.weight` -> `layer1_0_conv1`: name the module after its parameters."""
    for arg in node.args[1:2]:
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            return arg.target.rsplit(".", 1)[0].replace(".", "_") or "lifted"
    return node.name


def _unique_name(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = f"{base}_lifted", 1
    while hasattr(gm, name):
        name, i = f"{base}_lifted{i}", i + 1
    return name
