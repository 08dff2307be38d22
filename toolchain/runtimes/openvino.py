"""ONNX files in Intel's OpenVINO CPU plugin (a dependency of the toolchain).

OpenVINO reads the Q/DQ ONNX as it is and runs the quantized parts in INT8 (its FakeQuantize
transformations), so an artifact chain that ends in `quantize_onnx` ships to OpenVINO unchanged;
what differs is the runtime that loads and checks it. This module is the whole of OpenVINO's
support: the runtime it registers is what a target profile names (`runtime = "openvino"`).
"""

from __future__ import annotations

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.feed import arrays
from toolchain.runtimes import Runtime, register


def load(artifact: Artifact, threads: int):
    import openvino as ov

    core = ov.Core()
    return _runner(core.compile_model(str(artifact.path), "CPU", {"INFERENCE_NUM_THREADS": threads}))


RUNTIME = register(Runtime("openvino", Kind.ONNX, "onnx", ".onnx", ("openvino",), load))


def load_ir(artifact: Artifact, threads: int):
    """An OpenVINO IR file on this host's CPU plugin, at the inference precision the file states
    (never the plugin's default: BF16 on CPUs that have it). An input whose shape the file does not
    take (another batch than its static one) gets the model's batch reshaped to it and compiled again,
    as a deployment at that batch would load it (the last such batch's compile is kept)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(artifact.path))
    precision = _rt(model, "runtime_options", "INFERENCE_PRECISION_HINT") or "f32"
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision}
    declared = [i.get_partial_shape() for i in model.inputs]
    as_saved = _runner(core.compile_model(model, "CPU", config))
    other: dict[tuple, object] = {}  # the one other batch compiled last (not a cache of every batch)

    def run(x) -> list[np.ndarray]:
        shapes = [tuple(a.shape) for a in arrays(x)]
        if len(shapes) != len(declared) or all(
            d.compatible(ov.PartialShape(list(s))) for d, s in zip(declared, shapes)
        ):
            return as_saved(x)
        # another batch: only the batch dimension changes, the rest stays as the file has it
        batch = tuple(s[0] if len(s) else None for s in shapes)
        if batch not in other:
            reshaped = model.clone()
            reshaped.reshape(
                {
                    i: ov.PartialShape([b, *list(d)[1:]])
                    for i, d, b in zip(reshaped.inputs, declared, batch)
                    if b is not None and d.rank.is_static and len(d) >= 1
                }
            )
            other.clear()
            other[batch] = _runner(core.compile_model(reshaped, "CPU", config))
        return other[batch](x)

    return run


def _runner(compiled):
    request = compiled.create_infer_request()

    from toolchain.core.feed import Feed, contiguous

    def run(x) -> list[np.ndarray]:
        request.infer(
            [contiguous(a) for a in x.arrays]
            if isinstance(x, Feed)
            else [np.ascontiguousarray(x, dtype=np.float32)]
        )
        return [np.array(request.get_output_tensor(i).data) for i in range(len(compiled.outputs))]

    return run


def _rt(model, *path: str) -> str | None:
    try:
        value = model.get_rt_info(list(path))
    except RuntimeError:  # not in the file
        return None
    return value.astype(str) if hasattr(value, "astype") else str(value)  # an OVAny


def devices() -> list[str]:
    """The devices OpenVINO sees on this machine (`toolchain doctor`); empty without OpenVINO."""
    try:
        import openvino as ov

        return list(ov.Core().available_devices)
    except Exception:  # noqa: BLE001 - a diagnostic: a broken install lists nothing
        return []


IR_RUNTIME = register(Runtime("openvino_ir", Kind.OPENVINO, "openvino-ir", ".xml", ("openvino",), load_ir))
