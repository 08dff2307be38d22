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
    """Dotted paths of the attributes that a TorchScript module's methods, or its submodules',
    assign (``prim::SetAttr`` on the module itself)."""
    import torch

    if not isinstance(module, torch.jit.ScriptModule):
        return ()
    found: list[str] = []
    for prefix, sub in module.named_modules():
        c = getattr(sub, "_c", None)
        if c is None:
            continue
        for method in c._method_names():
            graph = c._get_method(method).graph
            owner = next(iter(graph.inputs()), None)
            for node in graph.findAllNodes("prim::SetAttr"):
                on = _path_to(node.inputsAt(0), owner)
                if on is None:
                    continue
                path = ".".join(p for p in (prefix, *on, node.s("name")) if p)
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
