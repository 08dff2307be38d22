"""ONNX files in Intel's OpenVINO CPU plugin (optional: `pip install 'toolchain[openvino]'`).

OpenVINO reads the Q/DQ ONNX as it is and runs the quantized parts in INT8 (its FakeQuantize
transformations), so an artifact chain that ends in `quantize_onnx` ships to OpenVINO unchanged;
what differs is the runtime that loads and checks it. This module is the whole of OpenVINO's
support: the runtime it registers is what a target profile names (`runtime = "openvino"`).
"""

from __future__ import annotations

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.runtimes import Runtime, register


def load(artifact: Artifact, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(artifact.path), "CPU", {"INFERENCE_NUM_THREADS": threads})
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


RUNTIME = register(Runtime("openvino", Kind.ONNX, "onnx", ".onnx", ("openvino",), load))
