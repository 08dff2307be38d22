"""Everything a device needs to build a TensorRT engine, written without TensorRT.

- `calibration.cache`: per-tensor activation scales in TensorRT's own text format, taken
  from the same calibration as the INT8 Q/DQ ONNX, so an implicit-INT8 or DLA build on
  the device needs no data.
- `engine_plan.json`: precisions, optimization profile, workspace, DLA, timing cache,
  builder level, the TensorRT version expected, and the equivalent `trtexec` command.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import struct
from pathlib import Path
from typing import Sequence

from toolchain.core.artifact import onnx_fixed_batch
from toolchain.core.errors import ToolchainError
from toolchain.core.feed import Signature
from toolchain.core.options import option

log = logging.getLogger("toolchain")

CALIBRATOR = "EntropyCalibration2"


@dataclasses.dataclass(frozen=True)
class TensorRTOptions:
    version: str = option("8.5.2", "TensorRT version on the device (JetPack 5.1.x ships 8.5.2)")
    engine_from: str = option("onnx_int8_qdq", "artifact the engine is built from (explicit INT8 via Q/DQ)")
    calibration_from: str = option(
        "onnx_int8_qdq", "Q/DQ artifact whose activation scales fill the calibration cache"
    )
    fp32_onnx: str = option(
        "onnx_fp32", "FP32 ONNX for implicit-INT8 / DLA builds that read the calibration cache"
    )
    fp16: bool = option(True, "allow FP16 kernels (fallback for layers without Q/DQ)")
    profile_batch: tuple[int, ...] = option(
        (1, 8, 16),
        "TensorRT optimization profile batch sizes: min, opt, max (with a DLA core: opt only, "
        "DLA has no dynamic shapes)",
    )
    workspace_mb: int = option(1024, "builder workspace memory pool, MiB")
    dla_core: int = option(
        -1, "-1: GPU only; 0 or 1: that DLA core, with GPU fallback (needs the calibration cache)"
    )
    builder_optimization_level: int = option(3, "0-5; TensorRT 8.6 and later (ignored by 8.5)")
    timing_cache: str = option("timing.cache", "timing cache file, reused between builds on the same device")
    parity_samples: int = option(
        32, "validation inputs kept with their FP32 outputs, to check the engine on the device"
    )


def activation_scales(qdq_onnx: Path) -> dict[str, float]:
    """Scale of every activation QuantizeLinear (weights excluded), keyed by tensor name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(qdq_onnx), load_external_data=False).graph
    consts = {i.name: i for i in graph.initializer}
    scales = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in consts:
            scale = numpy_helper.to_array(consts[node.input[1]])
            if scale.size != 1:
                raise ToolchainError(
                    f"activation `{node.input[0]}` has per-channel scales; "
                    "TensorRT's cache holds one per tensor"
                )
            scales[node.input[0]] = float(scale.reshape(()))
    return scales


def cache_header(version: str) -> str:
    """`TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2`. NVIDIA's headers define the version integer
    as major*1000 + minor*100 + patch up to 8.x (NvInferRuntimeCommon.h: 8.5.2 -> 8502) and as
    major*10000 + minor*100 + patch from 10 on (NvInferRuntimeBase.h, NV_TENSORRT_VERSION_INT:
    10.3.0 -> 100300); a cache whose header does not match the library is ignored by TensorRT."""
    major, minor, patch = (int(p) for p in (version.split(".") + ["0", "0"])[:3])
    return f"TRT-{major * (10000 if major >= 10 else 1000) + minor * 100 + patch}-{CALIBRATOR}"


def write_calibration_cache(path: Path, scales: dict[str, float], version: str) -> None:
    """One `name: hex` line per tensor; hex is the big-endian bit pattern of the float32 scale."""
    lines = [cache_header(version)] + [f"{name}: {struct.pack('>f', s).hex()}" for name, s in scales.items()]
    path.write_text("\n".join(lines) + "\n")


def read_calibration_cache(path: Path) -> tuple[str, dict[str, float]]:
    header, *lines = path.read_text().splitlines()
    scales = {}
    for line in lines:
        name, _, value = line.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(value))[0]
    return header, scales


def engine_plan(
    opts: TensorRTOptions,
    inputs: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    fixed_batch: int | None = None,
) -> dict:
    """The plan for the engine. ``inputs``: each ONNX input's name, one sample's shape (batch excluded;
    None for a scalar) and its axes that may change size (a sequence: min 1, opt = max = the data's);
    ``fixed_batch``: the batch the ONNX file is fixed to, the only one its engine can take."""
    if (
        len(opts.profile_batch) != 3
        or not opts.profile_batch[0] <= opts.profile_batch[1] <= opts.profile_batch[2]
    ):
        raise ToolchainError(
            "tensorrt.profile_batch must be [min, opt, max] with min <= opt <= max "
            f"(got {list(opts.profile_batch)})"
        )
    dla = opts.dla_core >= 0
    # DLA has no dynamic dimensions: TensorRT needs min = opt = max, and runs only that shape
    batches = (
        (fixed_batch,) * 3 if fixed_batch else (opts.profile_batch[1],) * 3 if dla else opts.profile_batch
    )
    profiles = []
    for name, sample, dynamic in inputs:
        if sample is None:  # a scalar: one shape, nothing to optimize over
            profiles.append({"name": name, "min": [], "opt": [], "max": [], "static": True})
            continue
        low = [1 if i in dynamic and not dla else d for i, d in enumerate(sample)]
        shapes = dict(
            zip(("min", "opt", "max"), ([b, *dims] for b, dims in zip(batches, (low, sample, sample))))
        )
        profiles.append({"name": name, **shapes, "static": dla or bool(fixed_batch)})
    # the first batched input (the plan's key before `inputs`)
    plan = {
        "tensorrt_version": opts.version,
        "onnx": f"{opts.fp32_onnx if dla else opts.engine_from}.onnx",
        "int8_mode": "implicit (calibration cache)" if dla else "explicit (Q/DQ)",
        "calibration_cache": "calibration.cache",
        "precisions": ["int8", *(["fp16"] if opts.fp16 else [])],
        "input": next(p for p in profiles if p["min"]),
        "inputs": profiles,  # every input's optimization profile, in the model's order
        "workspace_mb": opts.workspace_mb,
        "dla_core": opts.dla_core if dla else None,
        "gpu_fallback": dla,
        "timing_cache": opts.timing_cache,
        "builder_optimization_level": opts.builder_optimization_level
        if _at_least(opts.version, 8, 6)
        else None,
        "engine": "model.engine",
    }
    plan["trtexec"] = shlex.join(trtexec_command(plan))
    return plan


def profiled_inputs(plan: dict) -> list[dict]:
    """The inputs a plan gives optimization profiles for (a plan from before `inputs`: its one `input`)."""
    return [p for p in plan.get("inputs", [plan["input"]]) if p["min"]]


def trtexec_command(plan: dict) -> list[str]:
    dims = lambda key: ",".join(f"{p['name']}:{'x'.join(map(str, p[key]))}" for p in profiled_inputs(plan))
    cmd = [
        "trtexec",
        f"--onnx={plan['onnx']}",
        "--int8",
        f"--minShapes={dims('min')}",
        f"--optShapes={dims('opt')}",
        f"--maxShapes={dims('max')}",
        f"--memPoolSize=workspace:{plan['workspace_mb']}",
        f"--timingCacheFile={plan['timing_cache']}",
        f"--saveEngine={plan['engine']}",
    ]
    if "fp16" in plan["precisions"]:
        cmd.insert(2, "--fp16")
    if plan["dla_core"] is not None:
        cmd += [
            f"--useDLACore={plan['dla_core']}",
            "--allowGPUFallback",
            f"--calib={plan['calibration_cache']}",
        ]
    if plan["builder_optimization_level"] is not None:
        cmd.append(f"--builderOptimizationLevel={plan['builder_optimization_level']}")
    fp32 = plan.get("fp32_layers", {}).get("nodes")
    if fp32:
        spec = ",".join(f"{name}:fp32" for name in fp32)
        cmd += ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    return cmd


def write_plan(
    folder: Path,
    opts: TensorRTOptions,
    signature,
    float_layers: tuple[str, ...] = (),
    fp32_layers: tuple[str, ...] = (),
    cache: bool = True,
) -> dict:
    """Write the cache and plan into the build folder; return the report's `engine` entry.

    ``float_layers``: the Q/DQ model's nodes that recovery left without Q/DQ; TensorRT runs them
    in FP16 when the plan allows FP16, else in FP32. ``fp32_layers``: nodes FP16 cannot hold (the FP16
    artifact kept them FP32): constrained to FP32 in the engine. Without ``cache`` (a QAT Q/DQ model,
    whose tensors are not the FP32 model's) no calibration cache is written; a GPU engine reads none."""
    import onnx

    graph = onnx.load(str(folder / f"{opts.engine_from}.onnx"), load_external_data=False).graph
    names = [i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    scales = activation_scales(folder / f"{opts.calibration_from}.onnx") if cache else {}
    if cache:
        write_calibration_cache(folder / "calibration.cache", scales, opts.version)
    plan = engine_plan(
        opts,
        [(name, None if s.scalar else s.shape, s.dynamic) for name, s in zip(names, signature.inputs)],
        onnx_fixed_batch(folder / f"{opts.engine_from}.onnx"),
    )
    if not cache:
        plan["calibration_cache"] = None
    if float_layers:
        plan["float_layers"] = {
            "nodes": list(float_layers),
            "precision": "fp16" if opts.fp16 else "fp32",
            "why": "kept out of INT8 by recovery: no Q/DQ around them in the ONNX file",
        }
    # in the Q/DQ model the engine is built from, a node fed by DequantizeLinear runs in INT8 (its range
    # is the scale's): an FP32 constraint would take it out of INT8. The others are held in FP32.
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    nodes = {n.name: n for n in graph.node}
    fp32_layers = tuple(
        name
        for name in fp32_layers
        if name in nodes and not any(made_by.get(i) == "DequantizeLinear" for i in nodes[name].input)
    )
    if fp32_layers and opts.fp16:
        plan["fp32_layers"] = {
            "nodes": list(fp32_layers),
            "why": "their FP32 values on the calibration inputs exceed FP16's range (65504): in FP16 they "
            "would be inf; the engine keeps them FP32 (--precisionConstraints=obey --layerPrecisions)",
        }
        plan["trtexec"] = shlex.join(trtexec_command(plan))
    (folder / "engine_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return {
        "status": "pending on device",
        "verified": False,
        "reason": "TensorRT engines are tied to the GPU and TensorRT version that build them: "
        "run `toolchain engine build <build folder>` (or the plan's trtexec command) on the device",
        "plan": "engine_plan.json",
        "calibration_cache": "calibration.cache" if cache else None,
        "calibration_tensors": len(scales),
        "trtexec": plan["trtexec"],
    }


def _at_least(version: str, major: int, minor: int) -> bool:
    parts = [int(p) for p in version.split(".")[:2]]
    return tuple(parts) >= (major, minor)


def plan_engine(
    opts: TensorRTOptions | None, reports: Sequence, folder: Path, signature: Signature
) -> dict | None:
    """NVIDIA targets: the calibration cache and engine plan; the engine itself is built on the device.
    ``reports`` are the build's checked artifacts (each with name, float_layers and stage_facts)."""
    if opts is None:
        return None
    missing = {opts.engine_from, opts.calibration_from, opts.fp32_onnx} - {r.name for r in reports}
    if missing:
        return {
            "status": "not planned",
            "verified": False,
            "reason": f"artifacts not built: {', '.join(sorted(missing))}",
        }
    float_layers = next(r.float_layers for r in reports if r.name == opts.engine_from)
    calibration = next(r for r in reports if r.name == opts.calibration_from)
    rescaled = sorted(
        {
            k
            for facts in calibration.stage_facts.values()
            for k in ("equalization", "smoothing")
            if facts.get(k)
        }
    )
    if opts.dla_core >= 0 and rescaled:  # DLA calibrates onnx_fp32 with the Q/DQ model's activation scales
        return {
            "status": "not planned",
            "verified": False,
            "reason": f"recovery rescaled {opts.calibration_from}'s weights ({' and '.join(rescaled)}: "
            "the same function, other activation ranges), so its activation scales do not fit "
            f"{opts.fp32_onnx}, which a DLA build calibrates; build on the GPU "
            "(tensorrt.dla_core = -1) from the Q/DQ model",
        }
    qat = calibration.stage_facts.get("quantize_onnx", {}).get("ranges") == "qat"
    if opts.dla_core >= 0 and qat:
        return {
            "status": "not planned",
            "verified": False,
            "reason": f"{opts.calibration_from} was built from a QAT state: its Q/DQ model is the fine-tuned "
            f"PyTorch model's export, whose tensors and weights are not {opts.fp32_onnx}'s, which a DLA "
            "build calibrates; build on the GPU (tensorrt.dla_core = -1) from the Q/DQ model",
        }
    # what the FP16 artifact kept in FP32 (its node names are the FP32 model's, as the Q/DQ model's are;
    # a QAT Q/DQ model is the fine-tuned model's export, whose nodes have other names: none then)
    fp32_layers = next(
        (
            r.stage_facts["float16_onnx"]["fp32_nodes"]
            for r in reports
            if r.stage_facts.get("float16_onnx", {}).get("fp32_nodes") and not qat
        ),
        (),
    )
    engine = write_plan(folder, opts, signature, float_layers, tuple(fp32_layers), cache=not qat)
    log.info("TensorRT engine: %s (%s)", engine["status"], engine["reason"])
    return engine
