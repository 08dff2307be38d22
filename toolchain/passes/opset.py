"""Convert an ONNX model down to an older opset (a target whose parser stops at 17: TensorRT 8.5).

torch's dynamo exporter writes opset 18 at the least. onnx's version converter takes most of
it down, but it has no down-adapter for some operators that opset 18 changed, even where the
older form computes the same thing:

- ``Split``-18 gained the ``num_outputs`` attribute (``torch.chunk``). ``Split``-13 splits into
  as many equal parts as it has outputs, or by a ``split`` input: the attribute is dropped when
  the axis divides evenly, else replaced by the sizes it implies (the last part smaller, as
  ``chunk`` makes it), which needs the axis length from shape inference.
- ``Pad``-18 gained an optional ``axes`` input; without it, it is ``Pad``-13.

Those nodes are rewritten to the older form here and kept out of the converter's way (it would
stop at them), then put back. Anything else the converter cannot take down raises
:class:`ConversionError` with the converter's own words (e.g. "No Previous Version of Col2Im
exists": the operator has no older form at all).
"""

from __future__ import annotations

import re

import numpy as np

from toolchain.passes.shapes import value_dims

_ASIDE = "toolchain.older_form"  # the domain a rewritten node waits in while the converter runs


class ConversionError(Exception):
    """The model cannot be converted down to the opset asked for."""


def convert_opset(proto, opset: int):
    """``proto`` converted down to ``opset`` and checked; returns (model, {operator: nodes
    rewritten by hand})."""
    import onnx
    from onnx import helper, version_converter

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    rewritten = _older_forms(model, opset) if 13 <= opset < 18 else {}  # the older forms are opset 13's
    if rewritten:
        model.opset_import.append(helper.make_opsetid(_ASIDE, 1))
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as e:
        raise ConversionError(_converter_words(e)) from None
    for node in converted.graph.node:
        if node.domain == _ASIDE:
            node.domain = ""
    kept = [o for o in converted.opset_import if o.domain != _ASIDE]
    del converted.opset_import[:]
    converted.opset_import.extend(kept)
    _drop_default_noop_with_empty_axes(converted, opset)
    try:
        onnx.checker.check_model(converted)
    except Exception as e:
        raise ConversionError(_converter_words(e)) from None
    return converted, rewritten


def _older_forms(model, opset: int) -> dict[str, int]:
    nodes = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ("Split", "Pad")]
    chunks = any(a.name == "num_outputs" for n in nodes if n.op_type == "Split" for a in n.attribute)
    shapes = value_dims(model) if chunks else {}  # before any node is set aside, which would hide its outputs
    counts: dict[str, int] = {}
    for node in nodes:
        if node.op_type == "Split":
            num = next((a for a in node.attribute if a.name == "num_outputs"), None)
            if num is not None:
                _split_by_sizes(node, num.i, model, shapes)
        elif node.op_type == "Pad":
            if len(node.input) > 3 and node.input[3]:
                raise ConversionError(
                    f"Pad `{node.name}` pads chosen axes (opset 18), which opset {opset} lacks"
                )
        node.domain = _ASIDE
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _split_by_sizes(node, parts: int, model, shapes: dict[str, list]) -> None:
    from onnx import numpy_helper

    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    dims = shapes.get(node.input[0])
    length = dims[axis] if dims is not None and -len(dims) <= axis < len(dims) else None
    if not isinstance(length, int):
        raise ConversionError(
            f"Split `{node.name}` (num_outputs={parts}) splits an axis whose length the graph leaves "
            f"open; opset 13's Split needs it"
        )
    kept = [a for a in node.attribute if a.name != "num_outputs"]
    del node.attribute[:]
    node.attribute.extend(kept)
    if length % parts == 0:
        return  # Split-13 without `split`: as many equal parts as outputs
    size = -(-length // parts)
    last = length - size * (parts - 1)
    if last < 0:  # chunk makes fewer parts than asked here; Split-18 itself is invalid
        raise ConversionError(f"Split `{node.name}` cannot make {parts} parts of an axis of {length}")
    sizes = np.array([size] * (parts - 1) + [last], dtype=np.int64)
    name = f"{node.output[0]}_split_sizes"
    model.graph.initializer.append(numpy_helper.from_array(sizes, name))
    del node.input[1:]
    node.input.append(name)


def _drop_default_noop_with_empty_axes(proto, opset: int) -> None:
    """onnx's converter copies Reduce*-18's `noop_with_empty_axes` onto the opset-13 form,
    which has no such attribute. At its default (0) it means nothing and is dropped; any
    other value cannot be expressed below opset 18."""
    if opset >= 18:
        return
    for node in proto.graph.node:
        if not node.op_type.startswith("Reduce"):
            continue
        kept = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
        if any(a.name == "noop_with_empty_axes" and a.i != 0 for a in node.attribute):
            raise ConversionError(
                f"{node.op_type} `{node.name}` needs noop_with_empty_axes, which opset {opset} lacks"
            )
        del node.attribute[:]
        node.attribute.extend(kept)


def _converter_words(e: BaseException) -> str:
    """The converter's message without its C++ location: "…/BaseConverter.h:66: adapter_lookup:
    Assertion `false` failed: No Adapter From Version $18 for Split" -> "No Adapter From Version 18
    for Split"."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    text = re.sub(r"^.*?failed: ", "", text)
    return text.replace("$", "")[:300]
