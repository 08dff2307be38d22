"""Arguments that are not tensors (a TorchScript model's ``sr: int``), fixed at one value per build.

A voice-activity detector shipped as TorchScript takes ``forward(x, sr: int)``: the sample rate is
a Python number, which no deployment runtime feeds (ONNX export, TensorRT, ExecuTorch and the
lite interpreter all specialise on it). A build fixes each such argument at one value: from
``--constant NAME=VALUE``, else the calibration / validation ``.npz`` (a 0-d array under the
argument's name, the same in both), else the argument's default. The model is then bound to
those values: every stage sees a model of its tensor inputs alone, every artifact computes the
model at the values the report states (report.json ``model.constants``). A tensor argument that
defaults to None (an optional mask) the data does not give is bound to None the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import DataError, ModelLoadError

NUMBER_TYPES = {"int": int, "float": float, "bool": bool}


@dataclasses.dataclass(frozen=True)
class Constant:
    """A forward argument no runtime can feed: a Python number, or an optional tensor (default None)."""

    name: str
    type: str  # "int", "float", "bool", or "Tensor?" (an optional tensor)
    default: Any = None
    has_default: bool = False


@dataclasses.dataclass(frozen=True)
class Bound:
    """A constant's value for this build and where it came from ("--constant", a data file, "default")."""

    name: str
    type: str
    value: Any
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "value": self.value, "source": self.source}


def script_arguments(model, source: str) -> tuple[tuple[str, ...], tuple[Constant, ...]]:
    """A TorchScript forward's tensor arguments and its constants, from its schema."""
    tensors, constants = [], []
    for a in model.forward.schema.arguments[1:]:  # after `self`
        kind = str(a.type)
        has_default = a.default_value is not None or a.has_default_value()
        if kind == "Tensor":
            tensors.append(a.name)
        elif kind in NUMBER_TYPES:
            constants.append(Constant(a.name, kind, a.default_value, has_default))
        elif kind == "Optional[Tensor]" and has_default and a.default_value is None:
            constants.append(Constant(a.name, "Tensor?", None, True))
        else:
            raise ModelLoadError(f"model `{source}`: forward argument `{a.name}` is a {kind}; the toolchain feeds tensors "
                                 f"and fixes int, float and bool arguments (and optional tensors left at None)")
    return tuple(tensors), tuple(constants)


def eager_constants(model) -> tuple[Constant, ...]:
    """An eager module's forward parameters annotated or defaulted as Python numbers."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    out = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        kind = next((k for k, t in NUMBER_TYPES.items() if p.annotation in (t, k)), None)
        if kind is None and type(p.default) in NUMBER_TYPES.values():
            kind = type(p.default).__name__
        if kind is not None:
            has = p.default is not p.empty
            out.append(Constant(p.name, kind, p.default if has else None, has))
    return tuple(out)


def parse_constants(items) -> dict[str, str]:
    """``("sr=16000", ...)`` or ``"sr=16000,gain=0.5"`` -> {name: text}."""
    if isinstance(items, str):
        items = items.split(",")
    out = {}
    for item in filter(None, (i.strip() for i in items or ())):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise DataError(f"--constant `{item}` must be NAME=VALUE (e.g. sr=16000)")
        out[name.strip()] = value.strip()
    return out


def resolve(constants: tuple[Constant, ...], given: Mapping[str, str], data_files: list[Path]) -> tuple[Bound, ...]:
    """Each constant's value: --constant, else the data files' 0-d array (they must agree), else its default."""
    names = {c.name for c in constants}
    unknown = sorted(set(given) - names)
    if unknown:
        known = ", ".join(sorted(names)) or "none"
        raise DataError(f"--constant names {', '.join(unknown)}, but the model's non-tensor arguments are {known}")
    bound = []
    for c in constants:
        if c.name in given:
            bound.append(Bound(c.name, c.type, _parsed(c, given[c.name], "--constant"), "--constant"))
            continue
        found = [(str(path), value) for path in data_files for value in [_stored(path, c.name)] if value is not None]
        if found:
            values = {str(_parsed(c, v, f"`{p}`")) for p, v in found}
            if len(values) > 1:
                raise DataError(f"the data files disagree on `{c.name}`: " + ", ".join(f"{v} in `{p}`" for p, v in found)
                                + "; a build fixes it at one value")
            bound.append(Bound(c.name, c.type, _parsed(c, found[0][1], f"`{found[0][0]}`"), found[0][0]))
        elif c.has_default:
            bound.append(Bound(c.name, c.type, c.default, "default"))
        else:
            raise DataError(f"the model's argument `{c.name}` is a Python {c.type}, which no deployment runtime feeds: "
                            f"a build fixes it at one value; pass --constant {c.name}=VALUE, or store it in the .npz as "
                            f"a 0-d array (np.savez(..., {c.name}=np.array(VALUE)))")
    return tuple(bound)


def _stored(path: Path, name: str):
    if Path(path).suffix != ".npz" or not Path(path).is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if name not in f.files:
                return None
            a = f[name]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return None  # the data reader reports an unreadable file
    if a.ndim != 0:
        raise DataError(f"`{path}`: `{name}` is one value for the whole build (a model argument, not a tensor input); "
                        f"store it as a 0-d array, not shape {a.shape}")
    return a.item()


def _parsed(c: Constant, value, origin: str):
    if c.type == "Tensor?":
        raise DataError(f"{origin}: `{c.name}` is an optional tensor input; leave it out (it stays None)")
    try:
        if c.type == "bool":
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return text in ("true", "1")
        number = float(value)
        if c.type == "int":
            if number != int(number):
                raise ValueError(value)
            return int(number)
        return number
    except (TypeError, ValueError):
        raise DataError(f"{origin}: `{c.name}` must be {'an' if c.type == 'int' else 'a'} {c.type}, got `{value}`") from None


def bind(model, names: tuple[str, ...], tensors: tuple[str, ...], bound: tuple[Bound, ...], example: tuple):
    """``model`` with every bound argument fixed: a module of the tensor arguments alone.

    A TorchScript model is traced through a wrapper that calls it with the constants (its own
    code stays scripted, control flow included; the values become constants of the trace, which
    freezing propagates); an eager model is wrapped.
    """
    import torch

    wrapper = _bound_class()(model, names, tensors, {b.name: b.value for b in bound})
    if isinstance(model, torch.jit.ScriptModule):
        with torch.inference_mode(False), torch.no_grad():
            return torch.jit.trace(wrapper, example, check_trace=False)
    return wrapper


@functools.cache
def _bound_class():
    import torch

    class BoundModel(torch.nn.Module):
        """The model called with its tensor arguments, in order, and its constants."""

        def __init__(self, model, names, tensors, values):
            super().__init__()
            self.model, self.names, self.tensors, self.values = model, names, tensors, values

        def forward(self, *args):
            given = {**dict(zip(self.tensors, args)), **self.values}
            return self.model(*(given[n] for n in self.names))

    return BoundModel
