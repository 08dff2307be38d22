"""ONNX forms for TorchScript operators the TorchScript-based exporter refuses on integers.

Scripted models compute on Python ints and Long tensors (``if not self._last_batch_size:``, flags
packed in bits). The exporter turns an int into a Long constant, then refuses ``not`` on it ("ONNX
export does NOT support exporting bitwise Not for non-boolean input values"), and refuses
``~``/``&``/``|``/``^`` on integer tensors, though ONNX has each: ``not x`` is ``x == 0``, and
opset 18 has BitwiseNot/And/Or/Xor (below 18, ``~x`` is ``-1 - x`` in two's complement). These
symbolics are registered for the length of one export (:func:`integer_symbolics`) and removed after,
leaving the exporter's own for everything it handles already (booleans).
"""

from __future__ import annotations

import contextlib

_BOOL = 9  # onnx.TensorProto.BOOL


def _is_bool(value) -> bool:
    from torch.onnx._internal.torchscript_exporter import symbolic_helper

    return symbolic_helper._is_bool(value)


def _not(g, value):
    """``not x``: for a number, whether it is zero."""
    return g.op("Not", value if _is_bool(value) else g.op("Cast", value, to_i=_BOOL))


def _bitwise_not(g, value):
    if _is_bool(value):
        return g.op("Not", value)
    if g.opset >= 18:
        return g.op("BitwiseNot", value)
    import torch
    from torch.onnx._internal.torchscript_exporter import _type_utils

    dtype = _type_utils.JitScalarType.from_value(value).dtype()
    minus_one = g.op("Constant", value_t=torch.tensor(-1, dtype=dtype))
    return g.op("Sub", minus_one, value)  # two's complement: ~x == -1 - x


def _binary(logical: str, bitwise: str, what: str):
    def symbolic(g, a, b):
        if _is_bool(a) and _is_bool(b):
            return g.op(logical, a, b)
        if g.opset < 18:
            from torch.onnx.errors import SymbolicValueError

            raise SymbolicValueError(f"{what} on integers needs opset 18 ({bitwise})", a)
        return g.op(bitwise, a, b)

    return symbolic


SYMBOLICS = {
    "aten::__not_": _not,
    "aten::bitwise_not": _bitwise_not,
    "aten::bitwise_and": _binary("And", "BitwiseAnd", "bitwise and"),
    "aten::__and_": _binary("And", "BitwiseAnd", "bitwise and"),
    "aten::bitwise_or": _binary("Or", "BitwiseOr", "bitwise or"),
    "aten::__or_": _binary("Or", "BitwiseOr", "bitwise or"),
    "aten::bitwise_xor": _binary("Xor", "BitwiseXor", "bitwise xor"),
    "aten::__xor_": _binary("Xor", "BitwiseXor", "bitwise xor"),
}


@contextlib.contextmanager
def integer_symbolics(opset: int):
    """The symbolics above, for the exports at ``opset`` inside the block (registered at that
    opset itself: the exporter takes the highest registration at or below the export's)."""
    import torch

    for name, fn in SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, fn, opset)
    try:
        yield
    finally:
        for name in SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
