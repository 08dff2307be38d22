"""Compile an ONNX model for the Hexagon NPU (HTP) of Snapdragon phones, on the x86 build host.

ONNX Runtime's QNN helpers quantize the model the way the HTP wants it (`qnn_preprocess_model`,
`get_qnn_qdq_config`: uint8 or uint16 activations, uint8 weights, per-channel where the HTP takes
it), then the QNN execution provider (onnxruntime-qnn, a plugin EP) compiles the Q/DQ model into
an HTP context binary for the profile's `htp_arch` and wraps it in an ONNX file with one
`EPContext` node: the file an Android app opens with ONNX Runtime's QNN EP. The whole graph on the
HTP comes first. Where the HTP refuses operators (LayerNormalization over two axes, an LSTM), the
compile is repeated with ONNX Runtime's CPU fallback (`cpu_fallback`, on by default): the HTP runs
what it takes as `EPContext` partitions and the phone's CPU runs the rest, and the artifact says so
(stage facts `offload: "partial"`, `htp_nodes`, `cpu_nodes`, `cpu_ops`, and a warning). A partial
context is loaded and run once in a separate process before it ships: onnxruntime-qnn's host
emulator aborts the whole process on some (an "Input name not found" seen with three partitions),
and a build must not die of it; such a context is refused naming the operators the CPU would run.

The HTP needs static shapes: the model is compiled for batch 1.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Literal

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import NotApplicable, StageError, reason
from toolchain.core.feed import ort_feed
from toolchain.core.native import native_stderr_off
from toolchain.core.options import option
from toolchain.core.stage import Recoverable, Stage, StageResult, register_stage
from toolchain.stages.quantize_onnx import ort_runner, quiet_onnxruntime

log = logging.getLogger("toolchain")

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
    cpu_fallback: bool = option(
        True,
        "when the HTP cannot take every node, compile again with the nodes it refuses on the phone's CPU "
        "(a labelled partial offload: `offload`, `cpu_ops` in the stage facts); false: skip the artifact",
    )


@register_stage
class CompileQnn(Stage, Recoverable):
    name = "compile_qnn"
    requires = ("onnx", "onnxruntime", "onnxruntime_qnn")
    transitions = {Kind.ONNX: Kind.ONNX}
    Options = CompileQnnOptions
    report_facts = (
        "checked_on", "htp_arch", "phone", "activations", "context_bytes",
        "offload", "htp_nodes", "cpu_nodes", "cpu_ops",
    )  # fmt: skip

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx
        from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

        o = self.options
        from toolchain.passes.rescale import rescale_onnx_into
        from toolchain.passes.smooth import Bits

        stem = f"{self.name}-{artifact.sha256[:12]}-{o.a16w8}-{o.per_channel}-{o.equalize}-{o.smooth}"
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
        qdq = ctx.workdir / f"{stem}-qdq.onnx"
        _quantize(source, qdq, o, ctx.calibration.x[: o.samples], names, overrides=self._weights(source))
        out = self.output_path(artifact, ctx, ".onnx")
        offload = {"offload": "whole graph", "cpu_nodes": 0}
        try:
            _compile(qdq, out, o, cpu_fallback=False)
        except Exception as whole:
            if not o.cpu_fallback:
                raise StageError(
                    f"compile_qnn: the HTP cannot take this model (cpu_fallback = false): {reason(whole)}"
                ) from None
            offload = self._partial(source, qdq, out, ctx, names, whole)
        facts = {
            "ranges": "calibration",
            "checked_on": (
                "host HTP emulation (libQnnHtp.so on x86): parity holds for the phone, latency does not"
            ),
            "htp_arch": o.htp_arch,
            "phone": HTP_ARCHS[o.htp_arch],
            "soc_model": o.soc_model,
            "activations": "uint16" if o.a16w8 else "uint8",
            **context_facts(out),
            **offload,
            **rescaled,
        }
        facts.update(self._weight_facts(qdq, ctx))
        return StageResult(dataclasses.replace(artifact, path=out, precision=self._precision()), facts)

    def _weights(self, source: Path) -> dict:
        """Per-tensor quantization overrides for the weights (none: the QNN config's 8-bit ones)."""
        return {}

    def _weight_facts(self, qdq: Path, ctx: BuildContext) -> dict:
        return {}

    def _precision(self) -> str:
        return "a16w8" if self.options.a16w8 else "int8"

    def _partial(
        self, source: Path, qdq: Path, out: Path, ctx: BuildContext, names: list[str], whole: Exception
    ) -> dict:
        """The model compiled with the CPU fallback allowed: once to learn which nodes the HTP refuses,
        then again with those nodes left unquantized (the phone's CPU runs them in float, as ONNX
        Runtime's CPU kernels want them), checked to run in a separate process; its offload facts.
        Raises StageError naming the operators the HTP refuses when that fails."""
        try:
            _compile(qdq, out, self.options, cpu_fallback=True)
            refused = [n.name for n in _cpu_nodes(out)]
            if refused:
                qdq = qdq.with_name(f"{qdq.stem}-htp-part.onnx")
                _quantize(
                    source,
                    qdq,
                    self.options,
                    ctx.calibration.x[: self.options.samples],
                    names,
                    refused,
                    self._weights(source),
                )
                _compile(qdq, out, self.options, cpu_fallback=True)
        except Exception as e:
            raise StageError(
                f"compile_qnn: the HTP cannot take this model, not even in part: {reason(whole)}; "
                f"with the CPU fallback: {reason(e)}"
            ) from None
        split = offload_facts(qdq, out)
        refused = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in split["cpu_ops"].items())
        probe = ctx.workdir / f"{out.stem}-probe.npz"
        np.savez(probe, **ort_feed(ctx.calibration.x[:1], names))
        failed = runs_apart(out, probe)
        if failed:
            raise StageError(
                f"compile_qnn: the HTP cannot take {refused} (the phone's CPU would run them in a partial "
                f"offload), and the host HTP emulator cannot run that partial context to check it: {failed}"
            )
        log.warning(
            "qnn_int8: partial offload: the HTP runs %d of %d nodes; the phone's CPU runs %s",
            split["htp_nodes"],
            split["htp_nodes"] + split["cpu_nodes"],
            refused,
        )
        return {"offload": "partial", **split}

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        return []

    def fixes(self) -> tuple[str, ...]:
        return ("equalize", "smooth", "a16w8")

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        from toolchain.passes.rescale import onnx_finds

        return fix == "a16w8" or onnx_finds(artifact.path, fix)


def _quantize(
    source: Path, qdq: Path, o: CompileQnnOptions, x, names: list[str], exclude=(), overrides=None
) -> None:
    """ONNX Runtime's QNN Q/DQ quantization of ``source`` into ``qdq``, calibrated on ``x`` one input
    at a time; the nodes ``exclude`` names stay in float; ``overrides``: per-tensor settings
    (`init_overrides`: 4-bit weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(range(len(x)))

        def get_next(self):
            i = next(self.rows, None)
            return None if i is None else ort_feed(x[i : i + 1], names)

    try:
        with (
            quiet_onnxruntime()
        ):  # the quantizer logs every tensor, and a pre-processing hint not needed here
            config = get_qnn_qdq_config(
                str(source),
                Reader(),
                activation_type=QuantType.QUInt16 if o.a16w8 else QuantType.QUInt8,
                weight_type=QuantType.QUInt8,
                per_channel=o.per_channel,
                nodes_to_exclude=list(exclude) or None,
                init_overrides=overrides or None,
            )
            quantize(str(source), str(qdq), config)
    except Exception as e:
        raise StageError(
            f"compile_qnn: ONNX Runtime's QNN quantizer refuses this model: {reason(e)}"
        ) from None


def _cpu_nodes(compiled: Path) -> list:
    """The compute nodes a compiled model left outside its EPContext partitions (Q/DQ aside)."""
    import onnx

    graph = onnx.load(str(compiled), load_external_data=False).graph
    return [n for n in graph.node if n.op_type not in _QDQ and n.op_type != "EPContext"]


def _compile(qdq: Path, out: Path, o: CompileQnnOptions, cpu_fallback: bool) -> None:
    import onnxruntime as ort

    with native_stderr_off():  # the QNN SDK's native logging
        ort.ModelCompiler(
            htp_session_options(o.htp_arch, o.soc_model, cpu_fallback=cpu_fallback),
            str(qdq),
            embed_compiled_data_into_model=o.embed,
        ).compile_to_file(str(out))


# quantization nodes are bookkeeping: where they fall to the CPU, their operator did
_QDQ = {"QuantizeLinear", "DequantizeLinear"}


def offload_facts(qdq: Path, compiled: Path) -> dict:
    """How a compiled model splits between the HTP and the CPU, counted in the Q/DQ model's compute
    nodes (Q/DQ pairs aside): ``htp_nodes``, ``cpu_nodes``, ``cpu_ops`` ({op type: count} on the CPU).
    The partitions are `context_facts`' ``epcontext_nodes``."""
    import collections

    import onnx

    before = [n for n in onnx.load(str(qdq), load_external_data=False).graph.node if n.op_type not in _QDQ]
    cpu = [n.op_type for n in _cpu_nodes(compiled)]
    return {
        "htp_nodes": len(before) - len(cpu),
        "cpu_nodes": len(cpu),
        "cpu_ops": dict(sorted(collections.Counter(cpu).items(), key=lambda kv: (-kv[1], kv[0]))),
    }


_PROBE = """
import sys
import numpy as np
import onnxruntime as ort
from toolchain.stages.compile_qnn import htp_session_options
session = ort.InferenceSession(sys.argv[1], htp_session_options(cpu_fallback=True))
session.run(None, dict(np.load(sys.argv[2])))
"""


def runs_apart(path: Path, feed: Path, timeout: int = 600) -> str | None:
    """Load ``path`` in the QNN EP (CPU fallback allowed) and run ``feed`` (an .npz of the inputs) in a
    child process; None when it ran, else why not (a native abort takes the child, not the build)."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), str(feed)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"it did not finish in {timeout} s"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    said = next(
        (line for line in reversed(lines) if "what()" in line or "Error" in line), lines[-1] if lines else ""
    )
    log.debug("QNN partial-offload probe (exit %s):\n%s", done.returncode, done.stderr[-4000:])
    how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
    return f"onnxruntime-qnn ended the process ({how}): {said[:200]}"


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


def htp_session_options(
    htp_arch: int = 0, soc_model: int = 0, extra: dict | None = None, cpu_fallback: bool = False
):
    """Session options that put the QNN plugin EP's HTP backend in charge; with no CPU fallback unless
    ``cpu_fallback`` (a partial offload: the nodes the HTP refuses run on ONNX Runtime's CPU EP)."""
    import onnxruntime as ort
    import onnxruntime_qnn

    register_qnn()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if cpu_fallback else "1")
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


@dataclasses.dataclass(frozen=True)
class CompileQnnInt4Options(CompileQnnOptions):
    a16w8: bool = option(
        True, "16-bit activations with the 4-bit weights (A16W4, what the HTP pairs them with); false: A8W4"
    )
    min_linear_share: float = option(
        0.5, "offered when the model's MatMul/Gemm weights are at least this share of all its weights"
    )


@register_stage
class CompileQnnInt4(CompileQnn):
    """The NPU context with 4-bit weights for the MatMul/Gemm layers (issue 31, part 2): symmetric int4,
    one scale per output channel (the HTP's 4-bit weight quantization: not blockwise), through ONNX
    Runtime's QNN quantizer's per-tensor overrides; the other weights stay 8-bit and the activations
    16-bit (A16W4) unless ``a16w8 = false``. Offered for Linear-heavy models, like the other 4-bit
    artifacts; ``int4_share`` is counted on the Q/DQ model it compiles (the context cannot be read)."""

    name = "compile_qnn_int4"
    Options = CompileQnnInt4Options
    report_facts = CompileQnn.report_facts + ("linear_weight_share", "int4_share")

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        import onnx

        from toolchain.stages.quantize_onnx_int4 import matmul_weight_share

        share = matmul_weight_share(onnx.load(str(artifact.path), load_external_data=False))
        if share < self.options.min_linear_share:
            raise NotApplicable(
                f"{self.name}: MatMul/Gemm weights are {share:.0%} of this model's weights (4-bit weights "
                f"are offered from {self.options.min_linear_share:.0%})"
            )
        made = super().apply(artifact, ctx)
        return StageResult(made.artifact, {**made.facts, "linear_weight_share": round(share, 4)})

    def _weights(self, source: Path) -> dict:
        import onnx
        from onnxruntime.quantization import QuantType

        graph = onnx.load(str(source), load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        overrides = {}
        for node in graph.node:
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in weights:
                transposed = any(a.name == "transB" and a.i for a in node.attribute)
                axis = 0 if node.op_type == "Gemm" and transposed else 1  # the output channels
                overrides[node.input[1]] = [{"quant_type": QuantType.QInt4, "symmetric": True, "axis": axis}]
        return overrides

    def _weight_facts(self, qdq: Path, ctx: BuildContext) -> dict:
        from toolchain.passes.onnx_share import onnx_int4_share

        try:
            return {"int4_share": onnx_int4_share(qdq, ctx.sample_shapes())["int4_share"]}
        except Exception:  # noqa: BLE001 - a label's measurement must never cost the artifact
            return {"int4_share": None}

    def _precision(self) -> str:
        return "int4"

    def fixes(self) -> tuple[str, ...]:
        return ("equalize", "smooth")  # already 16-bit activations
