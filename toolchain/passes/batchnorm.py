"""BatchNorm1d layers the quantizer cannot fold, rewritten as the depthwise Conv1d they compute."""

from __future__ import annotations


def batchnorm1d_as_convs(gm) -> list[str]:
    """Each BatchNorm1d that does not follow a convolution (so the quantizer cannot fold it: one
    after a ReLU, a pooling, an add) as the 1x1 depthwise Conv1d it computes (weight
    gamma/sqrt(var+eps), bias beta - mean*weight), in place; returns their module names.

    ExecuTorch's XNNPACK lowering turns such a BatchNorm into that convolution itself, after
    quantization: with its input quantized and its new weights not, lowering stops ("Weight and
    Input should both be quantized"; a 1-D Conv -> ReLU -> BatchNorm, measured with ExecuTorch
    1.x here; the 2-D case lowers). Made a convolution before quantization, its weights are
    quantized with the rest. The new node keeps the BatchNorm's module name, so `float_layers`
    and sensitivity still name it."""
    import torch

    convs = {torch.ops.aten.conv1d.default, getattr(torch.ops.aten.conv1d, "padding", None)}
    params, buffers = dict(gm.named_parameters()), dict(gm.named_buffers())
    replaced = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        x, weight, bias, mean, var, training = node.args[:6]
        eps = node.args[7] if len(node.args) > 7 else 1e-5
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if (
            training
            or val is None
            or val.dim() != 3
            or not all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in (mean, var))
        ):
            continue
        if x.op == "call_function" and x.target in convs:
            continue  # Conv -> BatchNorm: the quantizer folds it
        tensor = lambda a: None if a is None else params.get(a.target, buffers.get(a.target))
        gamma, beta, mu, sigma2 = (tensor(a) for a in (weight, bias, mean, var))
        scale = (gamma if gamma is not None else torch.ones_like(mu)) / torch.sqrt(sigma2 + eps)
        shift = (beta if beta is not None else torch.zeros_like(mu)) - mu * scale
        name = f"_bn_as_conv_{len(replaced)}"
        gm.register_buffer(f"{name}_weight", scale.detach().reshape(-1, 1, 1).clone())
        gm.register_buffer(f"{name}_bias", shift.detach().clone())
        with gm.graph.inserting_before(node):
            w = gm.graph.get_attr(f"{name}_weight")
            b = gm.graph.get_attr(f"{name}_bias")
            conv = gm.graph.call_function(
                torch.ops.aten.conv1d.default, (x, w, b, [1], [0], [1], int(mu.numel()))
            )
        conv.meta = dict(node.meta)
        w.meta["val"], b.meta["val"] = gm.get_buffer(f"{name}_weight"), gm.get_buffer(f"{name}_bias")
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)
        replaced.append(module_of(conv) or node.name)
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


def module_of(node) -> str | None:
    """The innermost module a graph node was traced in (its fully qualified name)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[-1][0].removeprefix("L['self'].") if stack else None
