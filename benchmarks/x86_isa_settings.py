"""What the AVX2-safe INT8 settings cost in speed, on this machine: ResNet18 (random weights,
seeded) quantized by ONNX Runtime as U8S8 full range (exact only with VNNI), U8S8 with 7-bit
weights (`reduce_range`, what `x86_fbgemm` ships for `isa = "avx2"`) and U8U8, timed in one
loop at batch 1 and 8, alternating, 2 threads. Run alone: `python benchmarks/x86_isa_settings.py`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolchain.measure.cpu import host_cpu  # noqa: E402


def main():
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    import toolchain

    rng = np.random.default_rng(0)
    cal = rng.standard_normal((256, 3, 224, 224), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "cal.npy", cal)
        # the x86 build itself: passes without recovery (random weights: not judged)
        start = time.perf_counter()
        _, folder = toolchain.build(
            "torchvision:resnet18", "x86_fbgemm", Path(tmp) / "build", Path(tmp) / "cal.npy"
        )
        print(
            "toolchain build torchvision:resnet18 --target x86_fbgemm (256 calibration inputs): "
            f"{time.perf_counter() - start:.1f} s"
        )
        fp32 = folder / "onnx_fp32.onnx"  # the toolchain's export and graph passes; each variant quantizes it
        input_name = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).get_inputs()[0].name
        cal = cal[:32]

        class Reader:
            def __init__(self):
                self.i = 0

            def get_next(self):
                self.i += 8
                return {input_name: cal[self.i - 8 : self.i]} if self.i <= len(cal) else None

        variants = {
            "U8S8 full range": (QuantType.QUInt8, QuantType.QInt8, False),
            "U8S8 7-bit weights (reduce_range)": (QuantType.QUInt8, QuantType.QInt8, True),
            "U8U8": (QuantType.QUInt8, QuantType.QUInt8, False),
        }
        sessions = {}
        for name, (act, weight, reduce) in variants.items():
            path = Path(tmp) / f"{len(sessions)}.onnx"
            quantize_static(
                str(fp32),
                str(path),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce,
                activation_type=act,
                weight_type=weight,
            )
            o = ort.SessionOptions()
            o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 2, 1, 3
            sessions[name] = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        print(f"host: {host_cpu()['model']} ({host_cpu()['isa']})")
        for batch, runs in ((1, 60), (8, 15)):
            x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
            times = {n: [] for n in sessions}
            for s in sessions.values():
                s.run(None, {input_name: x})
            for _ in range(runs):
                for n, s in sessions.items():
                    t = time.perf_counter_ns()
                    s.run(None, {input_name: x})
                    times[n].append((time.perf_counter_ns() - t) / 1e6)
            base = np.median(times["U8S8 full range"])
            for n, t in times.items():
                print(
                    f"batch {batch}: {n:36} {np.median(t):8.2f} ms  "
                    f"({np.median(t) / base:.2f}x U8S8 full range)"
                )


if __name__ == "__main__":
    main()
