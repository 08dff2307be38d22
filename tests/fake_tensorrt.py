"""A stand-in for TensorRT and cuda-python that keeps the real APIs' contracts, so the engine code
runs end to end where TensorRT cannot be installed (it is not on the package registries here).

What it enforces, from NVIDIA's Python API documentation for 8.5, 10 and 11:
- `tensorrt.__version__` has four parts (`8.5.2.2`); the calibration cache header carries
  NV_TENSORRT_VERSION (8.x: major*1000 + minor*100 + patch; 10 and later: major*10000 + ...).
- 8.x: the ONNX parser needs a network created with the EXPLICIT_BATCH flag; 10 makes explicit
  batch the default (flag deprecated); 11 removes the flag and the implicit-INT8 calibrators.
- `builder_optimization_level` exists from 8.6.
- An optimization profile's shapes: min <= opt <= max, for a network input by its name; DLA needs
  static shapes (min = opt = max), otherwise the build fails.
- `set_input_shape` returns False for an unknown name or a shape outside the profile, and an
  engine then refuses to run (`execute_async_v3` returns False) until every input has a valid
  shape and every I/O tensor an address.
- An engine built by one TensorRT version does not deserialize in another (None).
- Before 8.6 the ONNX parser has no LayerNormalization (onnx-tensorrt's operator table, 8.5-GA: "N").
The "GPU" runs the ONNX file with ONNX Runtime; device memory is host memory behind integer
addresses, copied with `cudaMemcpy` like the real thing.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types

import numpy as np


def install(monkeypatch, version: str = "8.5.2.2", gpu: str = "Xavier", capability: tuple[int, int] = (7, 2)):
    """Put a fake `tensorrt` of ``version`` and a fake `cuda.bindings.runtime` into sys.modules."""
    trt = _tensorrt(version)
    rt = _cudart(gpu, capability)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, rt
    for name, module in (
        ("tensorrt", trt),
        ("cuda", cuda),
        ("cuda.bindings", bindings),
        ("cuda.bindings.runtime", rt),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return trt


def version_int(version: str) -> int:
    major, minor, patch = (int(p) for p in version.split(".")[:3])
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def _tensorrt(version: str) -> types.ModuleType:
    major = int(version.split(".")[0])
    minor = int(version.split(".")[1])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, level=None):
            self.level = level

    members = {"EXPLICIT_BATCH": 0} if major < 11 else {}
    members["STRONGLY_TYPED"] = 1
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", members)
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE DLA_MANAGED_SRAM")
    trt.BuilderFlag = enum.Enum(
        "BuilderFlag", "FP16 INT8 GPU_FALLBACK STRICT_TYPES OBEY_PRECISION_CONSTRAINTS"
    )
    trt.DeviceType = enum.Enum("DeviceType", "GPU DLA")
    trt.TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
    trt.DataType = enum.Enum("DataType", "FLOAT HALF INT8 INT32")
    trt.float32, trt.float16 = trt.DataType.FLOAT, trt.DataType.HALF
    trt.Logger = Logger

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Layer:
        """One per ONNX node, named after it, as the real parser names most layers."""

        def __init__(self, node):
            self.name, self.precision, self.outputs = node.name, trt.DataType.FLOAT, list(node.output)
            self.output_types: dict[int, object] = {}
            self.precision_is_set = False

        @property
        def num_outputs(self):
            return len(self.outputs)

        def get_output(self, i):
            return Tensor(self.outputs[i])

        def set_output_type(self, i, dtype):
            assert 0 <= i < len(self.outputs) and isinstance(dtype, trt.DataType)
            self.output_types[i] = dtype

        def __setattr__(self, key, value):
            if key == "precision" and hasattr(self, "precision"):
                object.__setattr__(self, "precision_is_set", True)
            object.__setattr__(self, key, value)

    trt.nptype = lambda dtype: {
        trt.DataType.FLOAT: np.float32,
        trt.DataType.HALF: np.float16,
        trt.DataType.INT32: np.int32,
        trt.DataType.INT8: np.int8,
    }[dtype]

    class Network:
        def __init__(self, flags):
            self.flags, self.onnx, self.inputs, self.dynamic, self.layers = flags, None, [], [], []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse_from_file(self, path):
            import onnx

            explicit = (
                "EXPLICIT_BATCH" not in trt.NetworkDefinitionCreationFlag.__members__
                or self.network.flags & (1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
            )
            if major < 10 and not explicit:
                self.errors.append(
                    "Network must have explicit batch dimension (ONNX parser needs EXPLICIT_BATCH)"
                )
                return False
            model = onnx.load(path)
            missing = (
                sorted({n.op_type for n in model.graph.node if n.op_type == "LayerNormalization"})
                if (major, minor) < (8, 6)
                else []
            )
            if missing:
                self.errors.append(
                    f"No importer registered for op: {missing[0]}. Attempting to import as plugin."
                )
                return False
            inits = {i.name for i in model.graph.initializer}
            self.network.layers = [Layer(n) for n in model.graph.node]
            self.network.onnx = model.SerializeToString()
            self.network.inputs = [i.name for i in model.graph.input if i.name not in inits]
            self.network.dynamic = [
                i.name
                for i in model.graph.input
                if i.name not in inits
                and any(not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)
            ]
            return True

    class OptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            if (
                not (len(min) == len(opt) == len(max))
                or any(a > b for a, b in zip(min, opt))
                or any(a > b for a, b in zip(opt, max))
            ):
                raise ValueError(f"optimization profile for {name}: need min <= opt <= max")
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    class TimingCache:
        def __init__(self, data):
            self.data = data or b"timing"

        def serialize(self):
            return self.data

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.cache, self.default_device_type = (
                set(),
                [],
                None,
                trt.DeviceType.GPU,
            )
            self.DLA_core, self._calibrator = -1, None

        def set_memory_pool_limit(self, pool, size):
            assert isinstance(pool, trt.MemoryPoolType) and size > 0

        def set_flag(self, flag):
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        @property
        def int8_calibrator(self):
            return self._calibrator

        @int8_calibrator.setter
        def int8_calibrator(self, value):
            if major >= 11:
                raise AttributeError("TensorRT 11 has no implicit-INT8 calibrators")
            self._calibrator = value

    if (major, minor) >= (8, 6):
        Config.builder_optimization_level = 3

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return OptimizationProfile()

        def build_serialized_network(self, network, config):
            given = set(config.profiles[0].shapes) if config.profiles else set()
            if not set(network.dynamic) <= given or not given <= set(network.inputs):
                # a profile for each dynamic input, by name (static ones may be left out), and for no
                # unknown one
                return None
            shapes = config.profiles[0].shapes if config.profiles else {}
            if config.default_device_type == trt.DeviceType.DLA and any(
                s[0] != s[2] for s in shapes.values()
            ):
                return None  # "DLA does not support dynamic dimensions: min, opt and max must be equal"
            if config.default_device_type == trt.DeviceType.DLA:
                cache = config.int8_calibrator.read_calibration_cache() if config.int8_calibrator else b""
                if not cache.decode().startswith(f"TRT-{version_int(version)}-"):
                    # TensorRT ignores a cache of another version; with no data, INT8 calibration fails
                    return None
            fp32 = [
                layer.name
                for layer in network.layers
                if layer.precision_is_set and layer.precision == trt.DataType.FLOAT
            ]
            if fp32 and not config.flags & {
                trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS,
                trt.BuilderFlag.STRICT_TYPES,
            }:
                fp32 = []  # constraints without the flag are hints the builder may ignore
            header = json.dumps(
                {
                    "version": version,
                    "shapes": {k: list(map(list, v)) for k, v in shapes.items()},
                    "fp32_layers": fp32,
                }
            ).encode()
            return len(header).to_bytes(4, "little") + header + network.onnx

    class Engine:
        def __init__(self, header, onnx_bytes):
            import onnxruntime as ort

            self.shapes = {k: tuple(map(tuple, v)) for k, v in header["shapes"].items()}
            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.inputs = [i.name for i in self.session.get_inputs()]
            # TensorRT before 10 takes INT64 inputs (token ids) as INT32, the parser casting them
            self.types = {
                i.name: np.int64
                if i.type == "tensor(int64)"
                else np.int32
                if i.type == "tensor(int32)"
                else np.float32
                for i in self.session.get_inputs()
            }
            self.outputs = [o.name for o in self.session.get_outputs()]
            for (
                i
            ) in self.session.get_inputs():  # a static input (a 0-d one) takes its one shape, profile or not
                if all(isinstance(d, int) for d in i.shape):
                    self.shapes.setdefault(i.name, (tuple(i.shape),) * 3)

        @property
        def num_io_tensors(self):
            return len(self.inputs) + len(self.outputs)

        def get_tensor_name(self, i):
            return (self.inputs + self.outputs)[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in self.inputs else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return (
                trt.DataType.INT32 if self.types.get(name, np.float32) != np.float32 else trt.DataType.FLOAT
            )

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.input_shapes, self.addresses, self.output_shapes = engine, {}, {}, {}

        def set_input_shape(self, name, shape):
            if name not in self.engine.shapes:
                return False
            low, _, high = self.engine.shapes[name]
            shape = tuple(shape)
            if len(shape) != len(low) or any(not a <= s <= b for a, s, b in zip(low, shape, high)):
                return False
            self.input_shapes[name] = shape
            feed = {n: np.zeros(s, self.engine.types[n]) for n, s in self.input_shapes.items()}
            if set(feed) == set(self.engine.inputs):
                outs = self.engine.session.run(None, feed)
                self.output_shapes = {n: o.shape for n, o in zip(self.engine.outputs, outs)}
            return True

        def get_tensor_shape(self, name):
            return self.input_shapes.get(name) or self.output_shapes.get(name, (-1,))

        def set_tensor_address(self, name, address):
            self.addresses[name] = int(address)
            return True

        def execute_async_v3(self, stream_handle):
            if set(self.input_shapes) != set(self.engine.inputs) or set(self.addresses) != set(
                self.engine.inputs + self.engine.outputs
            ):
                return False
            feed = {
                n: _read(self.addresses[n], s, trt.nptype(self.engine.get_tensor_dtype(n))).astype(
                    self.engine.types[n]
                )
                for n, s in self.input_shapes.items()
            }
            for name, out in zip(self.engine.outputs, self.engine.session.run(None, feed)):
                out = np.ascontiguousarray(trt.fault(out), np.float32)
                ctypes.memmove(self.addresses[name], out.ctypes.data, out.nbytes)
            return True

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            size = int.from_bytes(data[:4], "little")
            try:
                header = json.loads(data[4 : 4 + size])
            except ValueError:
                return None
            if header.get("version") != version:
                return None  # engines are tied to the TensorRT version that built them
            return Engine(header, data[4 + size :])

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.fault = lambda output: output  # tests replace it to make an engine compute something else
    if major < 11:

        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return trt


def _read(address: int, shape, dtype=np.float32) -> np.ndarray:
    count = int(np.prod(shape))
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype).reshape(shape).copy()


def _cudart(gpu: str, capability: tuple[int, int]) -> types.ModuleType:
    rt = types.ModuleType("cuda.bindings.runtime")
    ok = rt.cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorMemoryAllocation": 2})
    rt.cudaMemcpyKind = enum.Enum("cudaMemcpyKind", "cudaMemcpyHostToDevice cudaMemcpyDeviceToHost")
    buffers: dict[int, ctypes.Array] = {}

    def malloc(size):
        buf = ctypes.create_string_buffer(int(size))
        buffers[ctypes.addressof(buf)] = buf
        return ok.cudaSuccess, ctypes.addressof(buf)

    def memcpy(dst, src, size, kind):
        device = dst if kind is rt.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        if device not in buffers or len(buffers[device]) < size:
            return (ok.cudaErrorMemoryAllocation,)
        ctypes.memmove(dst, src, size)
        return (ok.cudaSuccess,)

    props = types.SimpleNamespace(name=gpu.encode(), major=capability[0], minor=capability[1])
    rt.cudaMalloc = malloc
    rt.cudaMemcpy = memcpy
    rt.cudaFree = lambda ptr: (
        (ok.cudaSuccess,) if buffers.pop(int(ptr), None) is not None else (ok.cudaErrorMemoryAllocation,)
    )
    rt.cudaStreamCreate = lambda: (ok.cudaSuccess, 1)
    rt.cudaStreamSynchronize = lambda stream: (ok.cudaSuccess,)
    rt.cudaStreamDestroy = lambda stream: (ok.cudaSuccess,)
    rt.cudaGetDeviceCount = lambda: (ok.cudaSuccess, 1)
    rt.cudaGetDeviceProperties = lambda device: (ok.cudaSuccess, props)
    rt.live_buffers = buffers
    return rt
