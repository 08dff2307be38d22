"""Compile an ONNX model for the Hexagon NPU (HTP) of Snapdragon phones, on the x86 build host.

ONNX Runtime's QNN helpers quantize the model the way the HTP wants it (`qnn_preprocess_model`,
`get_qnn_qdq_config`: uint8 or uint16 activations, uint8 weights, per-channel where the HTP takes
it), then the QNN execution provider (onnxruntime-qnn, a plugin EP) compiles the Q/DQ model into
an HTP context binary for the profile's `htp_arch` and wraps it in an ONNX file with one
`EPContext` node: the file an Android app opens with ONNX Runtime's QNN EP. The CPU fallback is
disabled: an operator the HTP cannot take fails the compile, and the artifact is skipped with
that reason, rather than shipping a model that runs partly on the phone's CPU.

The HTP needs static shapes: the model is compiled for batch 1.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import StageError, reason
from toolchain.core.feed import ort_feed
from toolchain.core.native import native_stderr_off
from toolchain.core.options import option
from toolchain.core.stage import Recoverable, Stage, StageResult, register_stage
from toolchain.stages.quantize_onnx import ort_runner, quiet_onnxruntime

# Hexagon architectures and the phones that carry them
HTP_ARCHS = {
    68: "Snapdragon 888",
    69: "Snapdragon 8 Gen 1",
    73: "Snapdragon 8 Gen 2",
    75: "Snapdragon 8 Gen 3",
    79: "Snapdragon 8 Elite",
}


@dataclasses.dataclass(frozen=True)
class CompileQnnOptions:
    htp_arch: Literal[68, 69, 73, 75, 79] = option(
        73,
        "Hexagon architecture of the phone: 68 (888), 69 (8 Gen 1), 73 (8 Gen 2), 75 (8 Gen 3), 79 (8 Elite)",
    )
    soc_model: int = option(0, "QNN SoC model id of the phone (0: any SoC with that htp_arch)")
    equalize: bool = option(
        False, "cross-layer equalization first (same function in FP32); recovery tries it"
    )
    smooth: bool = option(
        False,
        "SmoothQuant's LayerNorm -> Linear scale migration first (same function in FP32); recovery tries it",
    )
    a16w8: bool = option(
        False, "16-bit activations (A16W8), the HTP's answer to INT8 accuracy loss; recovery tries it"
    )
    per_channel: bool = option(True, "per-channel weights where the HTP takes them")
    embed: bool = option(True, "context binary inside the .onnx (false: a side `<name>_qnn.bin`)")
    samples: int = option(64, "calibration inputs used (batch 1 each)")
    float_layers: tuple[str, ...] = option(
        (), "unused: the HTP runs the whole graph; recovery tries 16-bit activations instead"
    )


@register_stage
class CompileQnn(Stage, Recoverable):
    name = "compile_qnn"
    requires = ("onnx", "onnxruntime", "onnxruntime_qnn")
    transitions = {Kind.ONNX: Kind.ONNX}
    Options = CompileQnnOptions
    report_facts = ("checked_on", "htp_arch", "phone", "activations", "context_bytes")

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

        o = self.options
        from toolchain.passes.rescale import rescale_onnx_into
        from toolchain.passes.smooth import Bits

        stem = f"qnn-{artifact.sha256[:12]}-{o.a16w8}-{o.per_channel}-{o.equalize}-{o.smooth}"
        static = ctx.workdir / f"{stem}-b1.onnx"
        onnx.save(batch_one(onnx.load(str(artifact.path)), ctx.calibration.x[:1]), str(static))
        rescaled = {}
        if o.equalize or o.smooth:
            bits = Bits(activations=16 if o.a16w8 else 8, per_channel=o.per_channel)
            rescaled = rescale_onnx_into(
                static,
                static.with_name(f"{stem}-rescaled.onnx"),
                lambda model: ort_runner(model, ctx),
                ctx.calibration.x[:128],
                self.name,
                o.equalize,
                o.smooth,
                bits,
            )
            static = static.with_name(f"{stem}-rescaled.onnx")
        pre = ctx.workdir / f"{stem}-pre.onnx"
        source = pre if qnn_preprocess_model(str(static), str(pre)) else static
        graph = onnx.load(str(source), load_external_data=False).graph
        names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
        x = ctx.calibration.x[: o.samples]

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.rows = iter(range(len(x)))

            def get_next(self):
                i = next(self.rows, None)
                return None if i is None else ort_feed(x[i : i + 1], names)

        qdq = ctx.workdir / f"{stem}-qdq.onnx"
        try:
            with (
                quiet_onnxruntime()
            ):  # the quantizer logs every tensor, and a pre-processing hint it does not need here
                config = get_qnn_qdq_config(
                    str(source),
                    Reader(),
                    activation_type=QuantType.QUInt16 if o.a16w8 else QuantType.QUInt8,
                    weight_type=QuantType.QUInt8,
                    per_channel=o.per_channel,
                )
                quantize(str(source), str(qdq), config)
        except Exception as e:
            raise StageError(
                f"compile_qnn: ONNX Runtime's QNN quantizer refuses this model: {reason(e)}"
            ) from None
        out = self.output_path(artifact, ctx, ".onnx")
        try:
            with native_stderr_off():  # the QNN SDK's native logging
                ort.ModelCompiler(
                    htp_session_options(o.htp_arch, o.soc_model),
                    str(qdq),
                    embed_compiled_data_into_model=o.embed,
                ).compile_to_file(str(out))
        except Exception as e:
            raise StageError(
                f"compile_qnn: the HTP cannot take this model (no CPU fallback): {reason(e)}"
            ) from None
        facts = {
            "checked_on": (
                "host HTP emulation (libQnnHtp.so on x86): parity holds for the phone, latency does not"
            ),
            "htp_arch": o.htp_arch,
            "phone": HTP_ARCHS[o.htp_arch],
            "soc_model": o.soc_model,
            "activations": "uint16" if o.a16w8 else "uint8",
            **context_facts(out),
            **rescaled,
        }
        precision = "a16w8" if o.a16w8 else "int8"
        return StageResult(dataclasses.replace(artifact, path=out, precision=precision), facts)

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        return []

    def fixes(self) -> tuple[str, ...]:
        return ("equalize", "smooth", "a16w8")

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        from toolchain.passes.rescale import onnx_finds

        return fix == "a16w8" or onnx_finds(artifact.path, fix)


def batch_one(model, sample=None):
    """The model with a batch dimension of 1 wherever the batch was symbolic (the HTP is static), and
    any other symbolic axis (a sequence length) fixed to its size in ``sample`` (one batch of inputs)."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    from toolchain.core.feed import arrays

    fixed = {}
    given = arrays(sample) if sample is not None else ()
    for k, i in enumerate(model.graph.input):
        for axis, dim in enumerate(i.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and dim.dim_param not in fixed:
                fixed[dim.dim_param] = 1 if axis == 0 else (given[k].shape[axis] if k < len(given) else None)
    for param, size in fixed.items():
        if size is None:
            raise StageError(
                f"compile_qnn: the HTP needs static shapes and axis `{param}` has no size to fix it to"
            )
        make_dim_param_fixed(model.graph, param, size)
    if fixed:
        fix_output_shapes(model)
    return model


def htp_session_options(htp_arch: int = 0, soc_model: int = 0, extra: dict | None = None):
    """Session options that put the QNN plugin EP's HTP backend in charge, with no CPU fallback."""
    import onnxruntime as ort
    import onnxruntime_qnn

    register_qnn()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for k, v in (extra or {}).items():
        options.add_session_config_entry(k, v)
    provider = {"backend_path": onnxruntime_qnn.get_qnn_htp_path()}
    if htp_arch:  # compiling: the phone's architecture; running a compiled context: already in it
        provider["htp_arch"] = str(htp_arch)
    if soc_model:
        provider["soc_model"] = str(soc_model)
    options.add_provider_for_devices(devices, provider)
    return options


_registered = False


def register_qnn() -> None:
    """onnxruntime-qnn 2.x is a plugin EP: registered once per process (the old `providers=[...]`
    form is silently ignored and would run on the CPU)."""
    global _registered
    if not _registered:
        import onnxruntime as ort
        import onnxruntime_qnn

        with native_stderr_off():  # the library announces its thread-local configuration on load
            ort.register_execution_provider_library(
                "QNNExecutionProvider", onnxruntime_qnn.get_library_path()
            )
        _registered = True


def context_facts(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path))
    contexts = [n for n in model.graph.node if n.op_type == "EPContext"]
    size = 0
    for node in contexts:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        blob = attrs.get("ep_cache_context", b"")
        size += len(blob) if attrs.get("embed_mode", 1) == 1 else (path.parent / blob.decode()).stat().st_size
    return {
        "epcontext_nodes": len(contexts),
        "context_bytes": size,
        "other_nodes": sorted({n.op_type for n in model.graph.node if n.op_type != "EPContext"}),
    }
