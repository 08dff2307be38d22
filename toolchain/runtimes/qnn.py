"""EPContext ONNX files with a Hexagon (HTP) context binary, run on the build host through the
QNN execution provider's HTP library (host HTP emulation, onnxruntime-qnn): the same compiled
context a phone runs, so its outputs are the phone's; its host latency says nothing about the phone."""

from __future__ import annotations

import numpy as np

from toolchain.core.artifact import Artifact, Kind
from toolchain.core.feed import ort_feed
from toolchain.runtimes import Runtime, register


def load(artifact: Artifact, threads: int):
    import onnx
    import onnxruntime as ort

    from toolchain.core.native import native_stderr_off
    from toolchain.stages.compile_qnn import htp_session_options

    # a partial offload (nodes beside the EPContext ones) runs those on the CPU, as on the phone
    partial = any(
        n.op_type != "EPContext" for n in onnx.load(str(artifact.path), load_external_data=False).graph.node
    )
    with native_stderr_off():  # the QNN SDK's native logging
        session = ort.InferenceSession(str(artifact.path), htp_session_options(cpu_fallback=partial))
    names = [i.name for i in session.get_inputs()]

    def run(x) -> list[np.ndarray]:  # compiled for batch 1
        parts = [session.run(None, ort_feed(x[i : i + 1], names)) for i in range(len(x))]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]

    return run


RUNTIME = register(
    Runtime(
        "qnn", Kind.ONNX, "onnx-epcontext", ".onnx", ("onnxruntime", "onnxruntime_qnn"), load, emulated=True
    )
)
