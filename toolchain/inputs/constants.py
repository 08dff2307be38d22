"""Arguments that are not tensors (a TorchScript model's ``sr: int``), fixed at one value per build.

A voice-activity detector shipped as TorchScript takes ``forward(x, sr: int)``: the sample rate is
a Python number, which no deployment runtime feeds (ONNX export, TensorRT, ExecuTorch and the
lite interpreter all specialise on it). A build fixes each such argument at one value: from
``--constant NAME=VALUE``, else the calibration / validation ``.npz`` (a 0-d array under the
argument's name, the same in both), else the argument's default; a ``.pt2`` has it fixed already
(torch.export specialises a Python number at its example value). The model is then bound to those
values: every stage sees a model of its tensor inputs alone, every artifact computes the model at
the values the report states (report.json ``model.constants``). A TorchScript tensor argument that
defaults to None (an optional mask) is an input when the data gives it, else bound to None.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from toolchain.core.errors import DataError, ModelLoadError, reason

log = logging.getLogger("toolchain")

NUMBER_TYPES = {"int": int, "float": float, "bool": bool}


@dataclasses.dataclass(frozen=True)
class Constant:
    """A forward argument no runtime can feed: a Python number, or an optional tensor (default None)."""

    name: str
    type: str  # "int", "float", "bool", "Tensor?" (an optional tensor), or another type a .pt2 fixed
    default: Any = None
    has_default: bool = False
    fixed: bool = False  # torch.export specialised the program at ``default``: no other value runs


@dataclasses.dataclass(frozen=True)
class Bound:
    """A constant's value for this build and where it came from ("--constant", a data
    file, "default", "export")."""

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
            raise ModelLoadError(
                f"model `{source}`: forward argument `{a.name}` is a {kind}; the toolchain feeds tensors "
                f"and fixes int, float and bool arguments (and optional tensors left at None)"
            )
    return tuple(tensors), tuple(constants)


def exported_constants(ep) -> tuple[Constant, ...]:
    """The user inputs a torch.export program specialised (``ConstantArgument``):
    fixed at their example values."""
    out = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT" and type(spec.arg).__name__ == "ConstantArgument":
            value = spec.arg.value
            kind = "Tensor?" if value is None else type(value).__name__
            out.append(Constant(spec.arg.name, kind, value, True, fixed=True))
    return tuple(out)


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
        if name.strip() in out:
            raise DataError(
                f"--constant gives `{name.strip()}` twice ({out[name.strip()]} and {value.strip()}); "
                "a build fixes it at one value"
            )
        out[name.strip()] = value.strip()
    return out


def fed_from_data(constants: tuple[Constant, ...], data_files: list[Path]) -> tuple[str, ...]:
    """The optional tensor arguments the data gives (a batched array of that name): inputs, not constants."""
    return tuple(
        c.name
        for c in constants
        if c.type == "Tensor?"
        and not c.fixed
        and any(getattr(_array(p, c.name), "ndim", 0) for p in data_files)
    )


def resolve(
    constants: tuple[Constant, ...], given: Mapping[str, Any], data_files: list[Path]
) -> tuple[Bound, ...]:
    """Each constant's value: --constant, else the data files' 0-d array (they
    must agree), else its default."""
    names = {c.name for c in constants}
    unknown = sorted(set(given) - names)
    if unknown:
        known = ", ".join(sorted(names)) or "none"
        raise DataError(
            f"--constant names {', '.join(unknown)}, but the model's non-tensor arguments are {known}"
        )
    bound = []
    for c in constants:
        found = [
            (str(path), value)
            for path in data_files
            for value in [_stored(path, c.name)]
            if value is not None
        ]
        values = [("--constant", _parsed(c, given[c.name], "--constant"))] if c.name in given else []
        values += [(p, _parsed(c, v, f"`{p}`")) for p, v in found]
        if c.fixed:
            other = [(where, v) for where, v in values if v != c.default]
            if other:
                raise DataError(
                    f"{other[0][0]} gives `{c.name}` = {other[0][1]}, but the program was exported with "
                    f"`{c.name}` = {c.default} (torch.export fixes it): export it again at that value"
                )
            bound.append(Bound(c.name, c.type, c.default, "export"))
        elif c.name in given:
            for where, v in values[1:]:
                if v != values[0][1]:
                    log.warning(
                        "--constant %s=%s overrides %s=%s in `%s`", c.name, values[0][1], c.name, v, where
                    )
            bound.append(Bound(c.name, c.type, values[0][1], "--constant"))
        elif found:
            if len({repr(v) for _, v in values}) > 1:
                raise DataError(
                    f"the data files disagree on `{c.name}`: "
                    + ", ".join(f"{v} in `{p}`" for p, v in values)
                    + "; a build fixes it at one value"
                )
            bound.append(Bound(c.name, c.type, values[0][1], found[0][0]))
        elif c.has_default:
            bound.append(Bound(c.name, c.type, c.default, "default"))
        else:
            raise DataError(
                f"the model's argument `{c.name}` is a Python {c.type}, which no deployment runtime feeds: "
                f"a build fixes it at one value; pass --constant {c.name}=VALUE, or store it in the .npz as "
                f"a 0-d array (np.savez(..., {c.name}=np.array(VALUE)))"
            )
    return tuple(bound)


def _array(path: Path, name: str):
    if Path(path).suffix != ".npz" or not Path(path).is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return f[name] if name in f.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return None  # the data reader reports an unreadable file


def _stored(path: Path, name: str):
    a = _array(path, name)
    if a is None:
        return None
    if a.ndim != 0:
        raise DataError(
            f"`{path}`: `{name}` is one value for the whole build (a model argument, not a tensor input); "
            f"store it as a 0-d array, not shape {a.shape}"
        )
    return a.item()


def _parsed(c: Constant, value, origin: str):
    """``value`` (a number, or the text of one) as the argument's type; non-finite floats refused."""
    if c.type == "Tensor?":
        if value is None or str(value) == "None":
            return None
        raise DataError(
            f"{origin}: `{c.name}` is an optional tensor input: give it as a batched array in the data, "
            f"or leave it out (it stays None)"
        )
    if c.type not in NUMBER_TYPES:
        return value  # a value torch.export fixed (a string, say): compared as it is
    text = str(value).strip()
    try:
        if c.type == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if c.type == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(text)
            return int(value) if isinstance(value, (int, float)) else int(text)
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(text)
        return number
    except (TypeError, ValueError, OverflowError):
        article = "an" if c.type == "int" else "a"
        raise DataError(
            f"{origin}: `{c.name}` must be {article} "
            f"{c.type}{' (finite)' if c.type == 'float' else ''}, got `{value}`"
        ) from None


def bind(
    model,
    names: tuple[str, ...],
    tensors: tuple[str, ...],
    bound: tuple[Bound, ...],
    example: tuple,
    dynamic_batch: bool,
):
    """``model`` with every bound argument fixed: a model of the tensor arguments alone.

    A TorchScript model is traced through a wrapper that calls it with the constants (its own
    code stays scripted, control flow included; the values become constants of the trace, which
    freezing propagates). Any other (an eager module, an exported program's module) is exported
    through the wrapper: a torch.export program of the tensor inputs, the batch left free when the
    model's is (``example`` then has 2 samples). Raises DataError when the model rejects the values.
    """
    import torch

    wrapper = _bound_class()(model, names, tensors, {b.name: b.value for b in bound})
    at = ", ".join(f"{b.name}={b.value}" for b in bound) or "its inputs"
    try:
        if isinstance(model, torch.jit.ScriptModule):
            with torch.inference_mode(False), torch.no_grad():
                traced = torch.jit.trace(
                    wrapper, tuple(a[:1] if a.dim() else a for a in example), check_trace=False
                )
            # the scripted code inlined, so its branches on the values fold (`if mask is not None`)
            graph = traced.graph
            torch._C._jit_pass_inline(graph)
            torch._C._jit_pass_peephole(graph)  # `mask is not None` on a tensor the data gives: True
            torch._C._jit_pass_constant_propagation(graph)
            torch._C._jit_pass_dce(graph)
            return traced
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = (
                {"args": tuple({0: torch.export.Dim.AUTO} if a.dim() else None for a in example)}
                if dynamic_batch and all(len(a) > 1 for a in example if a.dim())
                else None
            )
            args = example if shapes else tuple(a[:1] if a.dim() else a for a in example)
            return torch.export.export(wrapper, args, dynamic_shapes=shapes)
    except Exception as e:
        raise DataError(f"the model rejects {at}: {reason(e)}") from None


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
