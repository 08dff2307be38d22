"""How much of a quantized torch model computes in INT8: the share of its multiply-accumulates per
sample in INT8 kernels (``int8_share``, basis ``macs``), counted where the stage still holds the
model as modules or a graph (a frozen TorchScript file or an XNNPACK-delegated .pte no longer says).

- Modules (FX and dynamic INT8, what `torch_int8`, `ptl_int8` and the dynamic artifacts ship): one
  run on an example, each Linear, Conv and LSTM/GRU call counted, INT8 when its module is one of
  torch.ao's quantized ones (static, dynamic or fused intrinsic); matmuls between activations
  (``torch.matmul`` in a graph) count as FP32, as they run.
- An exported pt2e graph (`pte_int8`): linear, conv and matmul calls, INT8 when their input and
  weight both come from a dequantize node (the pattern XNNPACK lowers to INT8 kernels).
"""

from __future__ import annotations

import math

_INT8_PACKAGES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")


def module_int8_share(model, args: tuple) -> float | None:
    """The share of ``model``'s multiply-accumulates, over one call on ``args``, in INT8 modules."""

    counted = {"int8": 0, "float": 0}
    hooks = []

    def record(module, inputs, output):
        macs = module_macs(module, inputs, output)
        if macs:
            counted["int8" if type(module).__module__.startswith(_INT8_PACKAGES) else "float"] += macs

    # the outermost module that computes (a fused or quantized Linear holds a packed-params child):
    # each counted once, as itself
    hooked: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{h}.") for h in hooked if h) or not _computes(module):
            continue
        hooked.append(name)
        hooks.append(module.register_forward_hook(record))
    _run_hooked(model, args, hooks, counted)
    total = counted["int8"] + counted["float"]
    return round(counted["int8"] / total, 4) if total else None


def _run_hooked(model, args: tuple, hooks: list, matmuls: dict) -> None:
    """One call of ``model`` on ``args`` with its forward ``hooks`` counting (removed after); a
    graph's matmuls between activations counted into ``matmuls``."""
    import torch

    try:
        with torch.no_grad():
            if isinstance(model, torch.fx.GraphModule):
                _run_counting_matmuls(model, matmuls, args)
            else:
                model(*args)
    finally:
        for h in hooks:
            h.remove()


def _run_counting_matmuls(gm, counted: dict, args: tuple) -> None:
    """Runs the graph; matmuls between activations (no module to hook) counted as FP32."""
    import torch

    class Counter(torch.fx.Interpreter):
        def call_function(self, target, fargs, kwargs):
            out = super().call_function(target, fargs, kwargs)
            name = str(getattr(target, "__name__", target)).split(".")[0]
            if not isinstance(out, torch.Tensor) or not out.dim():
                return out
            per_sample = out.numel() // out.shape[0]
            if name in ("matmul", "bmm"):
                counted["float"] += per_sample * int(fargs[0].shape[-1])
            elif "quantized" in str(target) and name.startswith("linear"):  # torch.ops.quantized.linear*
                counted["int8"] += per_sample * int(fargs[0].shape[-1])
            return out

    Counter(gm).run(*args)


def _computes(module) -> bool:
    """A Linear, Conv or LSTM/GRU, float or quantized (what :func:`module_macs` counts)."""
    return (
        hasattr(module, "in_features")
        or (hasattr(module, "kernel_size") and hasattr(module, "in_channels") and hasattr(module, "groups"))
        or (getattr(module, "mode", None) in ("LSTM", "GRU") and hasattr(module, "hidden_size"))
    )


def module_macs(module, inputs, output) -> int:
    import torch

    out = output[0] if isinstance(output, tuple) else output
    if not isinstance(out, torch.Tensor) or not out.dim():
        return 0
    per_sample = out.numel() // max(1, out.shape[0])
    if hasattr(module, "in_features"):  # Linear, quantized and dynamic Linear, LinearReLU
        return per_sample * int(module.in_features)
    if hasattr(module, "kernel_size") and hasattr(module, "in_channels") and hasattr(module, "groups"):
        kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,)
        return per_sample * (int(module.in_channels) // int(module.groups)) * math.prod(kernel)
    mode = getattr(module, "mode", None)
    if mode in ("LSTM", "GRU") and hasattr(module, "hidden_size"):
        gates = 4 if mode == "LSTM" else 3
        x = inputs[0]
        if not isinstance(x, torch.Tensor):  # a packed sequence: not counted
            return 0
        steps = x.shape[1] if getattr(module, "batch_first", False) else x.shape[0]
        h, i = int(module.hidden_size), int(module.input_size)
        dirs = 2 if module.bidirectional else 1
        per_layer = [gates * h * ((i if layer == 0 else h * dirs) + h) for layer in range(module.num_layers)]
        return steps * dirs * sum(per_layer)
    return 0


def exported_int8_share(program) -> float | None:
    """The share of an exported pt2e graph's linear/conv/matmul multiply-accumulates whose input and
    weight both come from a dequantize node."""
    int8 = total = 0
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target)).split(".")[0]
        if name not in (
            "linear",
            "conv1d",
            "conv2d",
            "conv3d",
            "convolution",
            "matmul",
            "bmm",
            "mm",
            "addmm",
        ):
            continue
        out = node.meta.get("val")
        tensors = [a for a in node.args if hasattr(a, "meta")]
        if out is None or len(tensors) < 2 or not getattr(out, "shape", None):
            continue
        data, weight = (tensors[1], tensors[2]) if name == "addmm" and len(tensors) > 2 else tensors[:2]
        w = weight.meta.get("val")
        if w is None:
            continue
        per_sample = math.prod(out.shape[1:]) if len(out.shape) > 1 else 1
        if name.startswith("conv"):
            macs = per_sample * math.prod(w.shape[1:])
        elif name == "linear":
            macs = per_sample * w.shape[-1]
        else:  # matmul: the contracted dimension is the first operand's last
            macs = per_sample * data.meta["val"].shape[-1] if data.meta.get("val") is not None else 0
        macs = int(macs)
        total += macs
        if all(_dequantized(a) for a in (data, weight)):
            int8 += macs
    return round(int8 / total, 4) if total else None


def _dequantized(node) -> bool:
    return "dequantize" in str(getattr(node, "target", ""))


def module_macs_by_name(model, args: tuple) -> dict[str, int]:
    """Multiply-accumulates per sample of each Linear, Conv and LSTM/GRU module over one call on
    ``args``, by module name; matmuls between activations (a graph's ``torch.matmul``) under ``""``."""

    counted: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if name and _computes(module) and not any(name.startswith(f"{h}.") for h in counted):
            counted[name] = 0

            def record(module, inputs, output, name=name):
                counted[name] += module_macs(module, inputs, output)

            hooks.append(module.register_forward_hook(record))
    matmuls = {"int8": 0, "float": 0}
    _run_hooked(model, args, hooks, matmuls)
    counted[""] = matmuls["float"] + matmuls["int8"]
    return counted
