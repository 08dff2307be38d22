"""Build, run and check TensorRT engines. Needs TensorRT and a CUDA GPU; imported lazily.

Written against the TensorRT Python API as documented for 8.5, 10 and 11:
- 8.x needs the EXPLICIT_BATCH network flag; 10 made it the default (flag deprecated).
- I/O by tensor name (`set_input_shape`, `set_tensor_address`, `execute_async_v3`) exists
  from 8.5 on, so one code path runs on all three. `set_input_shape` returns False for a shape
  outside the optimization profile: inputs go in chunks that fit it, and a refusal is an error.
- `builder_optimization_level` exists from 8.6; implicit INT8 calibrators were deprecated in
  10.1 and removed in 11, so DLA builds with the calibration cache need 8.x or 10.x.
Device buffers use cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` in older releases).
CI runs this module against tests/fake_tensorrt.py, which keeps those contracts; the real
library runs it where TensorRT is installed (test_tensorrt's real-engine test skips elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np

from toolchain.core.errors import ToolchainError

log = logging.getLogger("toolchain")

NO_TENSORRT = (
    "TensorRT is not installed here (`import tensorrt` failed). Engines must be built on the "
    "device they run on: use the docker/ images, or run the plan's trtexec command there"
)


def import_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise ToolchainError(NO_TENSORRT) from None
    return tensorrt


def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise ToolchainError("cuda-python is not installed (pip install 'toolchain[tensorrt]')") from None
    return runtime


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ToolchainError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def gpu_info() -> dict:
    rt = cudart()
    if _check(rt.cudaGetDeviceCount()) < 1:
        raise ToolchainError("no CUDA GPU found")
    props = _check(rt.cudaGetDeviceProperties(0))
    name = props.name.decode().rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name, "compute_capability": f"{props.major}.{props.minor}"}


def _major(version: str) -> int:
    return int(version.split(".")[0])


def build_engine(folder: Path) -> dict:
    """Build the engine the plan describes with the Python API; save it and the timing cache."""
    trt = import_tensorrt()
    plan = json.loads((folder / "engine_plan.json").read_text())
    device = gpu_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if _major(trt.__version__) < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(folder / plan["onnx"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ToolchainError(f"TensorRT {trt.__version__} cannot parse {plan['onnx']}: {errors}")
    config = _builder_config(trt, builder, plan, folder)
    constrained = _fp32_layers(trt, network, config, plan)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ToolchainError("TensorRT could not build the engine (its log above says why)")
    engine_path = folder / plan["engine"]
    engine_path.write_bytes(bytes(serialized))
    (folder / plan["timing_cache"]).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt_version": trt.__version__,
        **device,
        "engine": plan["engine"],
        "sha256": hashlib.sha256(engine_path.read_bytes()).hexdigest(),
        "built_with": "python api",
        **({"fp32_layers": constrained} if constrained else {}),
    }


def _fp32_layers(trt, network, config, plan: dict) -> list[str]:
    """The plan's `fp32_layers` (nodes FP16 cannot hold) constrained to FP32, inputs and outputs, with
    the builder told to obey; matched by layer name (the ONNX parser names layers after their nodes).
    Returns the layers constrained; names it cannot find are logged."""
    wanted = list(plan.get("fp32_layers", {}).get("nodes", ()))
    if not wanted:
        return []
    found = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in wanted:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            found.append(layer.name)
    obey = getattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS", None) or trt.BuilderFlag.STRICT_TYPES
    config.set_flag(obey)
    missing = [n for n in wanted if n not in found]
    if missing:
        log.warning(
            "engine: %d of the %d FP32 layers are not in the parsed network by name (%s): TensorRT may run "
            "them in FP16",
            len(missing),
            len(wanted),
            ", ".join(missing[:5]),
        )
    return found


def _builder_config(trt, builder, plan: dict, folder: Path):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan["workspace_mb"] << 20)
    if "fp16" in plan["precisions"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)
    from toolchain.tensorrt.plan import profiled_inputs

    profile = builder.create_optimization_profile()
    # every batched input by name (a scalar has one shape: nothing to optimize)
    for io in profiled_inputs(plan):
        profile.set_shape(io["name"], io["min"], io["opt"], io["max"])
    config.add_optimization_profile(profile)
    cache_file = folder / plan["timing_cache"]
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if plan["builder_optimization_level"] is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = plan["builder_optimization_level"]
    if plan["dla_core"] is not None:
        if not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise ToolchainError(
                f"TensorRT {trt.__version__} has no implicit-INT8 calibrators; DLA INT8 needs 8.x or 10.x"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan["dla_core"]
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        config.int8_calibrator = _cache_calibrator(trt, (folder / plan["calibration_cache"]).read_bytes())
    return config


def _cache_calibrator(trt, cache: bytes):
    """A calibrator that only replays the cache: no data on the device."""

    class CacheOnly(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data):
            return None

    return CacheOnly()


def build_with_trtexec(folder: Path) -> dict:
    """The plan's trtexec command, for devices whose TensorRT Python bindings don't fit this Python
    (JetPack 5's are for Python 3.8)."""
    plan = json.loads((folder / "engine_plan.json").read_text())
    if shutil.which("trtexec") is None:
        raise ToolchainError("trtexec is not on PATH (JetPack: /usr/src/tensorrt/bin)")
    done = subprocess.run(plan["trtexec"], shell=True, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolchainError(f"trtexec failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    engine = folder / plan["engine"]
    return {
        "tensorrt_version": plan["tensorrt_version"] + " (expected; trtexec)",
        "engine": plan["engine"],
        "sha256": hashlib.sha256(engine.read_bytes()).hexdigest(),
        "built_with": "trtexec",
    }


def run_engine(engine_path: Path, x, max_batch: int, static_batch: int | None = None) -> list[np.ndarray]:
    """Every output of the engine on ``x`` (an ndarray, or a Feed for several inputs, in the
    engine's input order), in the engine's output order.

    The inputs go in chunks the engine's optimization profile accepts: at most ``max_batch`` rows,
    or exactly ``static_batch`` rows for a static (DLA) engine, the last chunk padded with copies
    of its rows whose outputs are dropped. A shape the engine refuses is an error, not garbage.
    """
    from toolchain.core.feed import arrays, repeat_to

    trt = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise ToolchainError(
            f"TensorRT {trt.__version__} cannot load {engine_path} (built by another version "
            "or for another GPU?)"
        )
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != len(arrays(x)):
        raise ToolchainError(
            f"the engine has {len(inputs)} inputs ({', '.join(inputs)}); the kept data has {len(arrays(x))}"
        )
    step = static_batch or max_batch
    results: list[list[np.ndarray]] = [[] for _ in outputs]
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        rows = len(chunk)
        if static_batch and rows < static_batch:
            chunk = repeat_to(chunk, static_batch)
        for kept, y in zip(results, _execute(trt, engine, context, inputs, outputs, arrays(chunk))):
            kept.append(y[:rows])
    return [np.concatenate(parts) for parts in results]


def _execute(trt, engine, context, names: list[str], outputs: list[str], xs) -> list[np.ndarray]:
    """One execution with cuda-python buffers."""
    rt = cudart()
    # a 0-d input stays 0-d
    xs = [np.require(x, trt.nptype(engine.get_tensor_dtype(n)), "C") for n, x in zip(names, xs)]
    for name, x in zip(names, xs):
        if not context.set_input_shape(name, x.shape):
            raise ToolchainError(
                f"the engine refuses input `{name}` of shape {x.shape}: outside its optimization profile"
            )
    ys = [
        np.empty(tuple(context.get_tensor_shape(n)), dtype=trt.nptype(engine.get_tensor_dtype(n)))
        for n in outputs
    ]
    stream = _check(rt.cudaStreamCreate())
    device: list = []
    try:
        for array in (*xs, *ys):
            device.append(_check(rt.cudaMalloc(array.nbytes)))
        for x, address in zip(xs, device):
            _check(rt.cudaMemcpy(address, x.ctypes.data, x.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
        for tensor, address in zip((*names, *outputs), device):
            context.set_tensor_address(tensor, int(address))
        if not context.execute_async_v3(int(stream)):
            raise ToolchainError("TensorRT execution failed")
        _check(rt.cudaStreamSynchronize(stream))
        for y, address in zip(ys, device[len(xs) :]):
            _check(rt.cudaMemcpy(y.ctypes.data, address, y.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))
    finally:
        for address in device:
            rt.cudaFree(address)
        rt.cudaStreamDestroy(stream)
    return [y.astype(np.float32) for y in ys]


def same_version(a: str, b: str) -> bool:
    """Whether two TensorRT version strings name the same release: `8.5.2` (a plan, trtexec) is
    `8.5.2.2` (`tensorrt.__version__`, four parts); compared on the parts both give."""
    pa, pb = a.split("."), b.split(".")
    n = min(len(pa), len(pb))
    return n >= 3 and pa[:n] == pb[:n]


def engine_mismatches(record: dict, tensorrt_version: str, gpu: dict) -> list[str]:
    """Why an engine described by ``record`` cannot run here (empty when it can)."""
    problems = []
    built = record.get("tensorrt_version", "").split(" ")[0]
    if built and not same_version(built, tensorrt_version):
        problems.append(f"built by TensorRT {built}, this is TensorRT {tensorrt_version}")
    if record.get("gpu") and record["gpu"] != gpu["gpu"]:
        problems.append(f"built for {record['gpu']}, this GPU is {gpu['gpu']}")
    if record.get("compute_capability") and record["compute_capability"] != gpu["compute_capability"]:
        problems.append(
            f"built for compute capability {record['compute_capability']}, "
            f"this GPU has {gpu['compute_capability']}"
        )
    return problems


def check_engine(engine_path: Path) -> dict:
    """Refuse an engine built by another TensorRT version or for another GPU than this one."""
    record_path = engine_path.with_name("engine.json")
    if not engine_path.is_file():
        raise ToolchainError(f"engine `{engine_path}` does not exist")
    trt = import_tensorrt()
    here = gpu_info()
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    problems = engine_mismatches(record, trt.__version__, here)
    if problems:
        raise ToolchainError(f"engine `{engine_path}` cannot run here: " + "; ".join(problems))
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    if runtime.deserialize_cuda_engine(engine_path.read_bytes()) is None:
        raise ToolchainError(
            f"engine `{engine_path}` does not load in TensorRT {trt.__version__} on {here['gpu']}"
        )
    return {"tensorrt_version": trt.__version__, **here, "ok": True}
