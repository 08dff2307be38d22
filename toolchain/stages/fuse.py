"""Operator fusion found on the graph, not from lists of module names.

Eager and exported models are traced to FX (exported ones lifted to module form first,
see :mod:`toolchain.passes.lift`) and fused by ``torch.ao.quantization.fuse_fx``, which matches
Conv-BN(-ReLU), Conv-ReLU, Linear(-BN)-ReLU and BN-ReLU on the graph and folds BatchNorm
into the preceding convolution. TorchScript models get the same Conv-BN folding from the
TorchScript pass that graph-mode quantization uses. ``torch.ao.quantization`` is
deprecated in favour of torchao's pt2e flow, but pt2e does not fuse into modules that
fbgemm's kernels run; this is the step that produces them.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import warnings

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.stage import Stage, StageResult, register_stage

PATTERNS = (("conv", "bn", "relu"), ("conv", "bn"), ("conv", "relu"), ("linear", "relu"), ("bn", "relu"))


@register_stage
class Fuse(Stage):
    name = "fuse"
    requires = ("torch",)
    transitions = {
        Kind.EAGER: Kind.FX,
        Kind.EXPORTED: Kind.FX,
        Kind.FX: Kind.FX,
        Kind.TORCHSCRIPT: Kind.TORCHSCRIPT,
    }

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        if artifact.kind is Kind.TORCHSCRIPT:
            return _fold_torchscript(artifact)
        import torch
        from torch.ao.quantization.quantize_fx import fuse_fx

        lifted = 0
        if artifact.kind is Kind.EXPORTED:
            from toolchain.passes.lift import lift_exported

            gm, lifted = lift_exported(artifact.model)
        else:
            try:
                gm = torch.fx.symbolic_trace(copy.deepcopy(artifact.model))
            except Exception as e:
                raise StageError(
                    f"fuse: the model cannot be traced with torch.fx ({reason(e, limit=200)}); "
                    f"export it with torch.export and pass the .pt2 instead"
                ) from None
        unshared = unshare_modules(gm)
        found = find_patterns(gm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            fused = fuse_fx(gm.eval())
        facts = {
            "patterns": dict(found),
            "lifted_from_aten": lifted,
            "unshared_modules": unshared,
            "modules_after": _fused_module_counts(fused),
        }
        return StageResult(dataclasses.replace(artifact, kind=Kind.FX, model=fused), facts)


def unshare_modules(gm) -> int:
    """Give each call site its own module instance (ResNet calls one ReLU twice per block).

    A fused module must own its parts; a part shared with another call site would be
    fused into one place and vanish from the other. Returns how many sites were copied.
    """
    seen: set[int] = set()
    copied = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if id(module) in seen:
            name = node.target.replace(".", "_") + f"_site{copied}"
            gm.add_submodule(name, copy.deepcopy(module))
            node.target = name
            copied += 1
        seen.add(id(module))
    gm.recompile()
    return copied


def find_patterns(gm) -> collections.Counter:
    """Count fusable chains (longest first); each node joins at most one chain."""
    roles = {n: _role(gm, n) for n in gm.graph.nodes}
    used: set = set()
    found: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if node in used:
            continue
        for pattern in PATTERNS:
            chain = _chain(node, pattern, roles)
            if chain and not used.intersection(chain):
                used.update(chain)
                found["-".join(pattern)] += 1
                break
    return found


def _chain(node, pattern, roles):
    chain = [node]
    for want in pattern:
        if roles.get(chain[-1]) != want:
            return None
        if want != pattern[-1]:
            users = list(chain[-1].users)
            if len(users) != 1:
                return None
            chain.append(users[0])
    return chain


def _role(gm, node) -> str | None:
    import torch
    from torch import nn

    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls, role in (
            (nn.modules.conv._ConvNd, "conv"),
            (nn.Linear, "linear"),
            (nn.modules.batchnorm._BatchNorm, "bn"),
            (nn.ReLU, "relu"),
        ):
            if isinstance(mod, cls):
                return role
    if node.op in ("call_function", "call_method") and node.target in (
        torch.relu,
        torch.nn.functional.relu,
        "relu",
    ):
        return "relu"
    return None


def _fused_module_counts(gm) -> dict[str, int]:
    counts = collections.Counter(type(m).__name__ for _, m in gm.named_modules())
    keep = ("ConvReLU", "LinearReLU", "BNReLU", "BatchNorm", "Conv", "Linear")
    return {k: v for k, v in sorted(counts.items()) if k.startswith(keep)}


def _fold_torchscript(artifact: Artifact) -> StageResult:
    import torch
    from torch.jit._recursive import wrap_cpp_module

    model = artifact.model.copy() if hasattr(artifact.model, "copy") else copy.deepcopy(artifact.model)
    before = _count_batchnorm(model)
    model = wrap_cpp_module(torch._C._jit_pass_fold_convbn(model._c))  # the pass returns the folded module
    after = _count_batchnorm(model)
    return StageResult(
        dataclasses.replace(artifact, model=model), {"patterns": {"conv-bn (folded)": before - after}}
    )


def _count_batchnorm(script_module) -> int:
    """BatchNorm calls left in the forward graph (a folded BatchNorm's submodule stays, unused)."""
    return str(script_module.inlined_graph).count("aten::batch_norm")
