"""Static INT8 quantization of an ONNX model with ONNX Runtime's quantizer and calibrators.

The QDQ format keeps the model portable (any runtime that reads QuantizeLinear /
DequantizeLinear); ONNX Runtime fuses the Q/DQ pairs into integer kernels at load time.
On x86 the fast combination is uint8 activations with int8 weights (U8S8): measured here on
ResNet18, 4.2 ms against 9.0 ms for the S8S8 default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
from pathlib import Path
from typing import Literal

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.context import BuildContext
from toolchain.core.errors import ConfigError, StageError, reason
from toolchain.core.feed import ort_feed
from toolchain.core.options import option
from toolchain.core.stage import QuantizationAware, Recoverable, Stage, StageResult, register_stage
from toolchain.measure.cpu import safe_reduce_range

log = logging.getLogger("toolchain")


@dataclasses.dataclass(frozen=True)
class QuantizeOnnxOptions:
    calibration: Literal["minmax", "entropy", "percentile"] = option(
        "minmax", "activation range: min/max, KL-divergence (entropy) or a percentile of the histogram"
    )
    percentile: float = option(99.999, "with calibration = percentile: the percentile kept")
    per_channel: bool = option(True, "per-output-channel weight scales")
    activations: Literal["uint8", "int8"] = option("uint8", "activation type (uint8 is fastest on x86 CPUs)")
    weights: Literal["int8", "uint8"] = option("int8", "weight type")
    symmetric_activations: bool = option(False, "zero-point 0 for activations (TensorRT needs it)")
    reduce_range: bool | None = option(
        None,
        "7-bit weights, for CPUs without VNNI whose U8S8 kernels saturate otherwise "
        "(unset: follow `runtime.isa`)",
    )
    op_types: tuple[str, ...] = option(
        (), "ONNX op types whose inputs get Q/DQ (empty: ONNX Runtime's default set)"
    )
    quantize_outputs: bool = option(True, "also quantize those ops' outputs (TensorRT wants inputs only)")
    dedicated_qdq_pair: bool = option(
        False, "one Q/DQ pair per consumer, so each can be fused on its own (TensorRT)"
    )
    preprocess: bool = option(
        True, "run ONNX Runtime's quantization pre-processing (shape inference, graph optimization) first"
    )
    batch_size: int = option(32, "calibration batch size")
    float_layers: tuple[str, ...] = option(
        (), "node names kept in floating point (no Q/DQ at their inputs); recovery sets it"
    )
    equalize: bool = option(
        False,
        "cross-layer equalization of Conv/Gemm/MatMul pairs first (same function in FP32); recovery tries it",
    )
    smooth: bool = option(
        False,
        "SmoothQuant: move LayerNorm outputs' outlier channel scales into the Linear weights that read them "
        "(same function in FP32); recovery tries it",
    )
    bias_correction: bool = option(
        False,
        "shift each Conv/Gemm bias by the mean error quantization adds on calibration "
        "inputs; recovery tries it",
    )
    float_masks: bool = option(
        False,
        "keep additive attention masks in float: each Softmax whose input a padding mask pushes below "
        "-1e3 on calibration inputs, and the Add that applies the mask "
        "(weights stay INT8); recovery tries it",
    )


# What recovery can keep in float: layers with weights, and the ops that quantize an activation of their
# own (normalizations, element-wise arithmetic, pooling and resizing that change values).
RECOVERABLE = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "Add",
    "Mul",
    "AveragePool",
    "GlobalAveragePool",
    "Resize",
)


@register_stage
class QuantizeOnnx(Stage, QuantizationAware, Recoverable):
    name = "quantize_onnx"
    requires = ("onnx", "onnxruntime")
    transitions = {Kind.ONNX: Kind.ONNX}
    Options = QuantizeOnnxOptions
    report_facts = (
        "reduce_range",
        "float_norms",
        "ranges",
        "qat_state",
        "weight_transposes_folded",
        "export",
    )
    # what a QAT state's Q/DQ must share with this stage; the calibration method only set its start
    qat_matching = ("activations", "weights", "symmetric_activations", "per_channel", "reduce_range")

    @classmethod
    def check_options(cls, options: QuantizeOnnxOptions, where: str, source: str) -> None:
        if not options.quantize_outputs and not options.op_types:
            raise ConfigError(
                f"{source}: `{where}.quantize_outputs` = false needs `{where}.op_types` "
                "(whose outputs to leave in float)"
            )

    def apply(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if self.uses_qat(artifact, ctx):
            return self._from_qat(artifact, ctx)
        o = self.options
        reduce_range = reduce_range_for(o.reduce_range, o.activations, o.weights, ctx.isa)
        path = self.output_path(artifact, ctx, ".onnx")
        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[o.calibration]
        extra = {
            "ActivationSymmetric": o.symmetric_activations,
            "WeightSymmetric": True,
            "DedicatedQDQPair": o.dedicated_qdq_pair,
        }
        if not o.quantize_outputs:
            extra["OpTypesToExcludeOutputQuantization"] = list(o.op_types)
        if o.calibration == "percentile":
            extra["CalibPercentile"] = o.percentile
        source = self._source(artifact, ctx)
        masks = self._masks(source, ctx) if o.float_masks else []
        quantizes_norms = not o.op_types or "LayerNormalization" in o.op_types
        norms = multi_axis_norms(source) if o.per_channel and quantizes_norms else []
        # Activation ranges are kept per (input, calibration): recovery's variants reuse them instead of
        # calibrating again. Only a run that keeps no layer in float writes them (it ranges every tensor).
        ranges = (
            ctx.workdir
            / f"ranges-{source.stem}-{o.calibration}-{o.percentile}-{o.symmetric_activations}.json"
        )
        cached = ranges.exists()
        with quiet_onnxruntime():
            try:
                quantize_static(
                    str(source),
                    str(path),
                    None if cached else _Reader(source, ctx, o.batch_size),
                    quant_format=QuantFormat.QDQ,
                    per_channel=o.per_channel,
                    reduce_range=reduce_range,
                    activation_type=types[o.activations],
                    weight_type=types[o.weights],
                    calibrate_method=method,
                    extra_options=extra,
                    op_types_to_quantize=list(o.op_types) or None,
                    nodes_to_exclude=[*o.float_layers, *masks, *norms] or None,
                    use_external_data_format=artifact.has_external_data,
                    calibration_cache_path=str(ranges) if cached or not o.float_layers else None,
                )
            except Exception as e:
                raise StageError(
                    f"quantize_onnx: ONNX Runtime cannot quantize this model: {reason(e)}"
                ) from None
        resorted = sort_nodes(path, artifact.has_external_data)
        facts = {
            **self.qat_facts(artifact, ctx),
            "calibration_samples": len(ctx.calibration.x),
            "reduce_range": reduce_range,
            "ranges_reused": cached,
            "float_layers": list(o.float_layers),
            **qdq_summary(path),
        }
        if resorted:
            facts["nodes_resorted"] = True
        if norms:
            facts["float_norms"] = norms
        facts.update(ctx.cache.get(("rescale_onnx", source.name), {}))  # equalization / smoothing, when done
        if o.float_masks:
            facts["float_masks"] = masks
        if o.bias_correction:
            from toolchain.passes.bias_correction import correct_biases

            facts["bias_correction"] = correct_biases(
                source, path, lambda model: ort_runner(model, ctx)(ctx.calibration.x[:128])
            )
        return StageResult(dataclasses.replace(artifact, path=path, precision="int8"), facts)

    def _masks(self, source: Path, ctx: BuildContext) -> list[str]:
        """The Softmax and Add nodes of additive attention masks in ``source`` (see
        toolchain.passes.masks), once per file."""
        from toolchain.passes.masks import onnx_mask_nodes

        key = ("masks", source.name)
        if key not in ctx.cache:
            ctx.cache[key] = onnx_mask_nodes(
                source, lambda model: ort_runner(model, ctx), ctx.calibration.x[:64]
            )
        return ctx.cache[key]

    def _source(self, artifact: Artifact, ctx: BuildContext) -> Path:
        """The model quantized: ONNX Runtime's pre-processed form (kept, so variants share node names)
        or the input, equalized and / or smoothed when the options say so (checked: the same function)."""
        o = self.options
        source = preprocessed(artifact, ctx) if o.preprocess else artifact.path
        reduce_range = reduce_range_for(o.reduce_range, o.activations, o.weights, ctx.isa)
        return rescaled(
            source, ctx, self.name, o.equalize, o.smooth, reduce_range, o.per_channel, o.symmetric_activations
        )

    # -- quantization-aware training (toolchain.qat) --

    def qat_settings(self, ctx: BuildContext) -> dict:
        o = self.options
        return {
            "activations": o.activations,
            "weights": o.weights,
            "symmetric_activations": o.symmetric_activations,
            "per_channel": o.per_channel,
            "reduce_range": reduce_range_for(o.reduce_range, o.activations, o.weights, ctx.isa),
            "calibration": o.calibration,
            "percentile": o.percentile,
        }

    def qat_prepares(self, kind: Kind) -> bool:
        return kind in (Kind.EAGER, Kind.FX, Kind.EXPORTED)  # torch.export cannot trace TorchScript

    def prepare_qat(self, artifact: Artifact, ctx: BuildContext):
        """The PyTorch model this ONNX file was exported from, with fake-quantization of this stage's
        types and ranges (:func:`qdq_config`) where XNNPACK's quantizer places Q/DQ (convolutions, matrix
        products, additions, pooling, concatenation), calibrated once; activation ranges then stay fixed,
        weight scales follow the weights. The build exports the fine-tuned model with those Q/DQ
        (:meth:`_from_qat`) instead of quantizing the FP32 export: ONNX Runtime's quantizer places
        Q/DQ by ONNX tensor names, which a fine-tuning in PyTorch cannot follow."""
        from toolchain.stages.quantize_pt2e import start_ranges

        self.refuse_rewrites()
        model, batch = self._qat_model(artifact, ctx, self.qat_settings(ctx))
        return start_ranges(model, batch, ctx, "calibrating (QAT, ONNX Q/DQ)")

    def _qat_model(self, artifact: Artifact, ctx: BuildContext, settings: dict):
        from toolchain.stages.quantize_pt2e import qat_twin_model

        source = artifact.source
        if source is None or not self.qat_prepares(source.kind):
            raise StageError(
                f"{self.name}: QAT prepares a PyTorch model (nn.Module or exported program) that this "
                "ONNX file was exported from; this one was "
                + ("a TorchScript model" if source is not None else "not exported by this build")
            )
        return qat_twin_model(
            source, ctx, qdq_config(settings, self.name), self.name, self.options.batch_size
        )

    def _from_qat(self, artifact: Artifact, ctx: BuildContext) -> StageResult:
        """The Q/DQ ONNX model of the QAT state: the twin rebuilt with the state's settings, its learned
        weights and ranges loaded, converted (INT8 weights, fixed Q/DQ) and exported at the input's opset
        and batch form. Nothing is calibrated; no layer can be kept in float (the state names its
        fake-quantizers by position)."""
        import onnx

        from toolchain.passes.qdq_weights import fold_weight_transposes
        from toolchain.stages.export_onnx import ExportOnnx, ExportOnnxOptions, opset_of, save_onnx
        from toolchain.stages.quantize_pt2e import converted_qat_state

        self.refuse_rewrites()
        model, _ = self._qat_model(artifact, ctx, ctx.qat.settings)
        converted = converted_qat_state(model, ctx, self.name)
        export = ExportOnnx(
            ExportOnnxOptions(opset=opset_of(artifact.path), dynamic_batch=artifact.fixed_batch() is None)
        )
        twin = dataclasses.replace(
            artifact, kind=Kind.FX, model=converted, path=None, precision="int8", source=None
        )
        made = export.apply(twin, ctx)
        proto = onnx.load(str(made.artifact.path))
        folded = fold_weight_transposes(proto)
        # the exporter's per-node stack traces: build-host paths, a third of the file
        for node in proto.graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
        path = self.output_path(artifact, ctx, ".onnx")
        save_onnx(proto, path, external=made.artifact.has_external_data)
        facts = {
            **self.qat_facts(artifact, ctx),
            "quantizer": "xnnpack placement, onnx q/dq",
            "reduce_range": ctx.qat.settings["reduce_range"],
            "float_layers": [],
            # how the fine-tuned model exported: a model whose batch (or sequence) could not stay free
            # is written at the fixed shapes it was traced with
            "export": {k: made.facts[k] for k in ("exporter", "opset", "dynamic_batch") if k in made.facts},
            "weight_transposes_folded": folded,
            **qdq_summary(path),
        }
        return StageResult(dataclasses.replace(artifact, path=path, precision="int8"), facts)

    def layers(self, artifact: Artifact, ctx: BuildContext) -> list[str]:
        import onnx

        if self.uses_qat(artifact, ctx):
            return []
        from onnxruntime.quantization.registry import QDQRegistry

        # Add / Mul: ORT's QDQ defaults
        quantized = set(self.options.op_types) or set(QDQRegistry) | {"Add", "Mul"}
        graph = onnx.load(str(self._source(artifact, ctx)), load_external_data=False).graph
        return [n.name for n in graph.node if n.op_type in RECOVERABLE and n.op_type in quantized and n.name]

    def calibrations(self) -> tuple[str, ...]:
        return ("minmax", "entropy", "percentile")

    def fixes(self) -> tuple[str, ...]:
        return ("float_masks", "equalize", "smooth", "bias_correction")

    def applies(self, fix: str, artifact: Artifact, ctx: BuildContext) -> bool:
        from toolchain.passes.rescale import onnx_finds

        if self.uses_qat(artifact, ctx):  # learned weights and ranges: nothing to rescale or correct
            return False
        if fix == "float_masks":  # a mask's Softmax or Add that this quantizer would give Q/DQ
            import onnx

            source = self._source(artifact, ctx)
            masks = set(self._masks(source, ctx))
            graph = onnx.load(str(source), load_external_data=False).graph
            quantized = set(self.options.op_types) or {"Add", "Softmax"}
            return any(n.name in masks and n.op_type in quantized for n in graph.node)
        if fix not in ("equalize", "smooth"):
            return True
        return onnx_finds(preprocessed(artifact, ctx) if self.options.preprocess else artifact.path, fix)


def qdq_config(settings: dict, stage: str):
    """A post-training pt2e QuantizationConfig with ONNX Runtime's Q/DQ for ``settings``
    (:meth:`QuantizeOnnx.qat_settings`): activations uint8 (asymmetric) or int8 (asymmetric, or
    symmetric in -127..127 with zero-point 0), weights int8 symmetric in -127..127 (-64..64 with
    ``reduce_range``), per output channel or per tensor; the activations' observer is the calibration
    method's: min/max, a percentile of the histogram, or for `entropy` torch's histogram search (which
    minimises the L2 error; ONNX Runtime's KL search has no PyTorch twin). Bias stays float: ONNX
    Runtime quantizes it at load, as it does its own Q/DQ models' int32 bias."""
    import torch
    from torch.ao.quantization.observer import HistogramObserver

    from toolchain.core.export import quiet_logger
    from toolchain.passes.observers import PercentileObserver

    with quiet_logger("torch.utils._pytree"):  # torchao registers an Enum with pytree; torch notes it
        from torchao.quantization.pt2e import MinMaxObserver, PerChannelMinMaxObserver
        from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec

    if settings["weights"] != "int8":
        raise StageError(f"{stage}: QAT prepares int8 weights (weights = {settings['weights']!r})")
    symmetric = settings["symmetric_activations"]
    if settings["activations"] == "uint8":
        if symmetric:
            raise StageError(f"{stage}: QAT cannot prepare symmetric uint8 activations: use int8")
        dtype, low, high = torch.uint8, 0, 255
    else:
        dtype, low, high = (torch.int8, -127, 127) if symmetric else (torch.int8, -128, 127)
    scheme = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    observer = {
        "minmax": MinMaxObserver.with_args(),
        "entropy": HistogramObserver.with_args(),
        "percentile": PercentileObserver.with_args(percentile=settings["percentile"]),
    }[settings["calibration"]]
    activation = QuantizationSpec(
        dtype=dtype, quant_min=low, quant_max=high, qscheme=scheme, observer_or_fake_quant_ctr=observer
    )
    limit = 64 if settings["reduce_range"] else 127
    per_channel = settings["per_channel"]
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-limit,
        quant_max=limit,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        ch_axis=0 if per_channel else None,
        observer_or_fake_quant_ctr=(PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(),
    )
    return QuantizationConfig(activation, activation, weight, None, False)


def multi_axis_norms(path: Path) -> list[str]:
    """The LayerNormalization nodes that normalize over more than one axis (a 2-D scale: LayerNorm over
    channels x frequency), which stay unquantized when weights are quantized per channel.

    ONNX Runtime's quantizer treats LayerNormalization's scale as a weight and its B as a bias, and
    with per-channel weights checks each bias element against an INT32 range, indexing B along one
    axis: a 2-D B makes that comparison an array, and quantize_static raises "The truth value of an
    array with more than one element is ambiguous". ONNX Runtime's CPU provider has no INT8
    LayerNormalization kernel (it dequantizes around one), so keeping these in float costs no speed
    there; the Conv/Gemm/MatMul layers around them are quantized as before."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: len(i.dims) for i in graph.initializer}
    return [
        n.name
        for n in graph.node
        if n.op_type == "LayerNormalization" and len(n.input) > 1 and dims.get(n.input[1], 1) > 1
    ]


def sort_nodes(path: Path, external: bool) -> bool:
    """Put the quantized graph's nodes back in an order where each runs after what it reads;
    True if they were not. ONNX Runtime's quantizer orders nodes by their own inputs only, so an
    `If` whose branch reads a value of the outer graph (the TorchScript exporter's form of
    `scatter_reduce`) can land before that value's producer, which the checker and runtimes refuse."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.passes.common import TopologicalSortPass

    try:
        onnx.checker.check_model(str(path))
        return False
    except onnx.checker.ValidationError as e:
        if "topologically sorted" not in str(e):
            return False  # not this stage's to judge: the runtime check says what is wrong
    model = ir.load(str(path))
    TopologicalSortPass()(model)
    ir.save(model, str(path), external_data=f"{path.name}.data" if external else None)
    return True


def rescaled(
    source: Path,
    ctx: BuildContext,
    stage: str,
    equalize: bool,
    smooth: bool,
    reduce_range: bool,
    per_channel: bool = True,
    symmetric: bool = False,
) -> Path:
    """``source`` equalized and / or smoothed (checked: the same function in FP32), kept beside it so
    recovery's variants share it; ``source`` itself when neither is asked. Its facts are cached under
    ``("rescale_onnx", file name)``."""
    from toolchain.passes.rescale import rescale_onnx_into
    from toolchain.passes.smooth import Bits

    if not (equalize or smooth):
        return source
    # reduce_range: 7-bit weights
    bits = Bits(weights=7 if reduce_range else 8, per_channel=per_channel, symmetric=symmetric)
    tag = f"smoothed{bits.weights}{'c' * per_channel}{'s' * symmetric}"
    prefix = "-".join(word for word, on in (("equalized", equalize), (tag, smooth)) if on)
    out = source.with_name(f"{prefix}-{source.name}")
    if not out.exists():
        ctx.cache[("rescale_onnx", out.name)] = rescale_onnx_into(
            source,
            out,
            lambda model: ort_runner(model, ctx),
            ctx.calibration.x[:128],
            stage,
            equalize,
            smooth,
            bits,
        )
    return out


def ort_runner(model, ctx: BuildContext):
    """Batched runs of a model (a path or a ModelProto) with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.log_severity_level = 3
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    first = next((i for i in session.get_inputs() if i.shape), session.get_inputs()[0])
    step = first.shape[0] if isinstance(first.shape[0], int) else None  # a model exported at a fixed batch

    def run(x) -> list[np.ndarray]:
        size = step or 64
        parts = [
            session.run(None, ort_feed(x[i : i + size], names))
            for i in range(0, len(x) - (len(x) % step if step else 0), size)
        ]
        return [np.concatenate(outputs) for outputs in zip(*parts)]

    return run


def reduce_range_for(option: bool | None, activations: str, weights: str, isa: str | None) -> bool:
    """The profile's explicit choice, else: 7-bit weights for U8S8 on a deployment CPU without
    VNNI (its 16-bit intermediate sums saturate with full-range weights), full range elsewhere."""
    if option is not None:
        return option
    return activations == "uint8" and weights == "int8" and safe_reduce_range(isa)


def qdq_summary(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    return {
        "quantize_nodes": ops.count("QuantizeLinear"),
        "dequantize_nodes": ops.count("DequantizeLinear"),
        "nodes": len(ops),
        "float_weight_share": float_weight_share(proto.graph),
    }


def float_weight_share(graph) -> float:
    """The share of weight elements (initializers of rank >= 2) still stored in a float type: what
    an "int8" label leaves unsaid (ONNX Runtime quantizes no GRU, for one)."""
    from onnx import TensorProto

    sizes = {}
    for t in graph.initializer:
        if len(t.dims) >= 2:
            n = 1
            for d in t.dims:
                n *= d
            sizes[t.name] = (
                n,
                t.data_type
                in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16),
            )
    total = sum(n for n, _ in sizes.values())
    return round(sum(n for n, f in sizes.values() if f) / total, 4) if total else 0.0


def preprocessed(artifact: Artifact, ctx: BuildContext) -> Path:
    """ONNX Runtime's pre-processed form of ``artifact`` in the work folder, made once per input and
    shared by the static and dynamic quantizers (and recovery's variants)."""
    out = ctx.workdir / f"preprocessed-{artifact.sha256[:16]}.onnx"
    if not out.exists():
        with quiet_onnxruntime():
            _preprocess_into(artifact.path, out)
    return out


def _preprocess_into(path: Path, out: Path) -> None:
    """Symbolic shape inference, ONNX shape inference and graph optimisation; without the symbolic
    step where it cannot finish (a sequence axis sliced by the model, say), as the model is where
    nothing works. ONNX Runtime saves an unfinished symbolic inference as `sym_shape_infer_temp.onnx`
    (and its `<uuid>.data`) in the working directory before raising: run it in the work folder."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # before the chdir: either may be relative to the working directory
    source, target = (path.resolve(), out.resolve())
    with contextlib.chdir(target.parent):
        for skip_symbolic in (False, True):
            try:
                quant_pre_process(str(source), str(target), skip_symbolic_shape=skip_symbolic)
                return
            except Exception as e:  # pre-processing is an optimisation
                log.debug(
                    "ONNX Runtime pre-processing%s failed: %s",
                    " without symbolic shapes" if skip_symbolic else "",
                    reason(e),
                )
    shutil.copyfile(source, target)  # quantize the model as it is


class _Reader:
    """Feeds the build's calibration inputs to ONNX Runtime's calibrator, in batches."""

    def __init__(self, model_path: Path, ctx: BuildContext, batch_size: int) -> None:
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.ctx, self.batch_size, self.start = ctx, batch_size, 0
        self.static_batch = _static_batch(graph)

    def get_next(self):
        x = self.ctx.calibration.x
        if self.start >= len(x):
            return None
        size = self.static_batch or self.batch_size
        batch = x[self.start : self.start + size]
        if self.static_batch and len(batch) < self.static_batch:
            return None
        self.start += len(batch)
        self.ctx.progress("calibrating (onnxruntime)", self.start, len(x))
        return ort_feed(batch, self.input_names)

    def rewind(self) -> None:
        self.start = 0


def _static_batch(graph) -> int | None:
    batched = [i for i in graph.input if i.type.tensor_type.shape.dim]  # a scalar input has no batch
    if not batched:
        return None
    dim = batched[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


@contextlib.contextmanager
def quiet_onnxruntime():
    """ONNX Runtime's quantizer logs every tensor at INFO and its histogram calibrators print()
    progress; keep the terminal short and stdout clean for `--json`."""
    level = logging.root.level
    # also its "consider pre-processing" hint: off on purpose for TensorRT names
    logging.root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.root.setLevel(level)
