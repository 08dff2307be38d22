"""Which ONNX operators TensorRT's ONNX parser lacks, per TensorRT release.

From onnx-tensorrt's `docs/operators.md` on the release branches (8.5-GA, 8.6-GA, 10.1-GA):
the operators marked "N", and the highest opset each release parses. A model with one of
them cannot become an engine on that release, whatever its parity on the host says, so the
build refuses the artifact with the operators named (``decompose_onnx`` expands
LayerNormalization for TensorRT 8.5).
"""

from __future__ import annotations

from toolchain.core.artifact import Artifact, Kind
from toolchain.tensorrt.plan import TensorRTOptions

_ALWAYS = frozenset(
    """
Bernoulli BitShift BlackmanWindow Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear
HammingWindow HannWindow Hardmax MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial
NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul STFT
SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
SoftmaxCrossEntropyLoss SplitToSequence StringNormalizer TfIdfVectorizer Unique IsInf
""".split()
)
# (first release, operators it lacks, highest opset it parses); IsInf is "N" in 8.5 and supported later
_RELEASES = (
    (
        (10, 0),
        (_ALWAYS - {"IsInf"})
        | {
            "AffineGrid",
            "BitwiseAnd",
            "BitwiseNot",
            "BitwiseOr",
            "BitwiseXor",
            "CenterCropPad",
            "ImageDecoder",
            "RegexFullMatch",
            "StringConcat",
            "StringSplit",
        },
        None,
    ),
    ((9, 0), _ALWAYS - {"IsInf"}, 19),
    ((8, 6), _ALWAYS - {"IsInf"}, 17),
    ((0, 0), _ALWAYS | {"LayerNormalization"}, 17),
)


def parser_gaps(proto, version: str) -> dict[str, list[str]]:
    """Operator type -> node names that TensorRT ``version``'s ONNX parser cannot import:
    operators it marks unsupported, operators from other domains, operators newer than the
    highest opset it parses (Gelu-20 for 8.x), and a model opset above that one."""
    from onnx import defs

    release = tuple(int(p) for p in (version.split(".") + ["0"])[:2])
    lacks, max_opset = next((ops, top) for first, ops, top in _RELEASES if release >= first)
    gaps: dict[str, list[str]] = {}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if max_opset is not None and opset is not None and opset > max_opset:
        gaps[f"opset {opset} (it reads up to {max_opset})"] = ["the model"]
    for node in proto.graph.node:
        foreign = node.domain not in ("", "ai.onnx")
        newer = False
        if not foreign and max_opset is not None:
            try:
                defs.get_schema(node.op_type, max_opset, "")
            except defs.SchemaError:
                newer = True  # no version of it exists at that opset
        if foreign or newer or node.op_type in lacks:
            gaps.setdefault(node.op_type if not foreign else f"{node.domain}.{node.op_type}", []).append(
                node.name
            )
    return gaps


def describe(gaps: dict[str, list[str]], version: str) -> str:
    parts = [
        f"{op} ({len(nodes)} node{'s' * (len(nodes) > 1)}, e.g. `{nodes[0]}`)"
        for op, nodes in sorted(gaps.items())
    ]
    return f"TensorRT {version}'s ONNX parser cannot import {', '.join(parts)}"


def parser_refuses(opts: TensorRTOptions | None, artifact: Artifact) -> str | None:
    """NVIDIA targets (``opts`` set): why the device's TensorRT could not parse an ONNX artifact (host
    parity says nothing about that), or None."""
    if opts is None or artifact.kind is not Kind.ONNX:
        return None
    import onnx

    gaps = parser_gaps(onnx.load(str(artifact.path), load_external_data=False), opts.version)
    if not gaps:
        return None
    return describe(gaps, opts.version) + (
        " (add `decompose_onnx` to the chain)" if "LayerNormalization" in gaps else ""
    )
