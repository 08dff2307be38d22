"""Map TOML tables onto frozen option dataclasses, type-checked, unknown keys refused.

Every option class is a frozen dataclass whose fields carry a ``help`` text in their
metadata (see :func:`option`). Errors name the file, the full key path and the valid
values, e.g. ``targets/x86.toml: `stages.quantize_onnx.calibration` must be one of
minmax, entropy, percentile (got "kl")``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from toolchain.core.errors import ConfigError

T = TypeVar("T")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a description of what it does."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata={"help": help})


def parse_options(cls: type[T], table: Any, where: str, source: str) -> T:
    """Build ``cls`` from a TOML table; ``where`` is the table's key path, ``source`` the file."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: `{where}` must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key `{_join(where, unknown[0])}`; valid keys: {', '.join(fields)}"
        )
    values = {
        name: _coerce(hints[name], table[name], _join(where, name), source)
        for name in fields
        if name in table
    }
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{source}: missing key `{_join(where, missing[0])}`")
    return cls(**values)


def options_as_dict(options: Any) -> dict[str, Any]:
    """JSON-ready view of an options dataclass (tuples become lists)."""
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint: Any, value: Any, where: str, source: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return parse_options(hint, value, where, source)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{source}: `{where}` must be one of {', '.join(map(str, choices))} (got {value!r})"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return _coerce(args[0], value, where, source)
    if origin is tuple:
        item = get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{source}: `{where}` must be an array of {_type_name(item)}")
        return tuple(_coerce(item, v, f"{where}[{i}]", source) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: `{where}` must be a table")
        return value
    return _scalar(hint, value, where, source)


def _scalar(hint: type, value: Any, where: str, source: str) -> Any:
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:
        raise TypeError(f"unsupported option type {hint!r} at {where}")
    if not ok:
        raise ConfigError(f"{source}: `{where}` must be {_article(hint)} (got {value!r})")
    return float(value) if hint is float else value


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return " | ".join(map(str, get_args(hint)))
    if get_origin(hint) is tuple:
        return f"array of {_type_name(get_args(hint)[0])}"
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint) if a is not type(None))
    return getattr(hint, "__name__", str(hint))


def _article(hint: type) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[hint]
