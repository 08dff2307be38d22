"""State a TorchScript model keeps between calls, and putting it back.

Streaming models (voice-activity detectors, keyword spotters) ship as scripted TorchScript that
assigns module attributes in ``forward``: an LSTM's state, the previous chunk's tail, the last
batch size. Each call then depends on every call before it, so the FP32 reference and an artifact
agree only if they start from the same state and see the same calls. The build fixes that: every
run of such a model, the reference's and each artifact's, starts from the state the model was
saved with (the values its file holds), and is put back there after each call, so stages that copy
the model later copy it as saved. A TorchScript artifact keeps the machinery (freezing preserves
assigned attributes) and is written with the saved values; an ONNX export holds those values as
constants: it computes one call from the saved state, and carries no state between calls.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class SavedState:
    """The values of every attribute a model's code assigns, by dotted path ("_state",
    "decoder._h"), as they were when taken."""

    values: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, module) -> SavedState | None:
        """The module's assigned attributes and their values now; None when its code assigns none
        (or it is not TorchScript: an eager module's assignments are not visible before it runs)."""
        paths = assigned_attributes(module)
        if not paths:
            return None
        return cls(tuple((p, copy.deepcopy(_get(module, p))) for p in paths))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.values)

    def restore(self, module) -> None:
        """Put the values back on ``module`` (the same model, or a frozen or quantized copy of it);
        a path the copy no longer has (folded away) is left alone."""
        for path, value in self.values:
            owner, _, name = path.rpartition(".")
            try:
                target = _get(module, owner) if owner else module
                setattr(target, name, copy.deepcopy(value))
            except (AttributeError, RuntimeError):
                continue


def assigned_attributes(module) -> tuple[str, ...]:
    """Dotted paths of the attributes a TorchScript module's ``forward`` assigns, itself or through
    the methods and submodules it calls (``prim::SetAttr`` in the inlined graph). Methods ``forward``
    never calls (``__setstate__`` of packed weights) are no state. Values changed in place
    (``self.buf.add_(x)``) are not seen."""
    import torch

    if not isinstance(module, torch.jit.ScriptModule) or not hasattr(module, "forward"):
        return ()
    try:
        graph = module.forward.graph.copy()
    except (AttributeError, RuntimeError):
        return ()
    torch._C._jit_pass_inline(graph)
    owner = next(iter(graph.inputs()), None)
    found: list[str] = []
    for node in graph.findAllNodes("prim::SetAttr"):
        on = _path_to(node.inputsAt(0), owner)
        if on is None:
            continue
        path = ".".join((*on, node.s("name")))
        if path not in found:
            found.append(path)
    return tuple(found)


def _path_to(value, owner) -> tuple[str, ...] | None:
    """The attribute names from the method's ``self`` to ``value`` (``self.model`` -> ("model",)), where
    it is reached by attribute reads alone; frozen or inlined code assigns through such chains."""
    names: list[str] = []
    while owner is None or value.unique() != owner.unique():
        node = value.node()
        if node.kind() != "prim::GetAttr":
            return None
        names.append(node.s("name"))
        value = node.inputsAt(0)
    return tuple(reversed(names))


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module
