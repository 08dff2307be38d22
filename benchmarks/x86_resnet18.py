"""ResNet18 on x86, batch 1, 2 threads: FP32 eager, the tutorial INT8 flow, ONNX Runtime's
`quantize_static` with defaults, and each toolchain artifact — latency (median of >= 30 runs
after warm-up) and size, all measured by the same harness in one run.

    .venv/bin/python benchmarks/x86_resnet18.py [--runs 50] [--calib 256]

Weights are random (no downloads here): latency and size do not depend on them.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
THREADS = 2


def measure(fn, x, warmup: int, runs: int) -> tuple[float, float]:
    """Median and p95 in ms, timed the way the toolchain times its artifacts."""
    from toolchain.measure.timing import time_runs

    times = time_runs(fn, x, warmup, runs)
    return float(np.median(times)), float(np.percentile(times, 95))


def torch_fn(model):
    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return run


def ort_fn(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = THREADS, 1, 3
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def state_size(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def tutorial_int8(fp32, calib: np.ndarray):
    """torchvision's quantizable ResNet18 with the FP32 model's weights, fuse_model(), fbgemm qconfig,
    eager prepare/convert (the recipe x86_peers.py times too)."""
    from x86_peers import tutorial_int8 as recipe

    return recipe({"arch": "resnet18"}, fp32, calib)


def ort_default_int8(fp32: torch.nn.Module, calib: np.ndarray, folder: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    src, dst = folder / "ort_fp32.onnx", folder / "ort_default_int8.onnx"
    torch.onnx.export(
        fp32, (torch.from_numpy(calib[:1]),), str(src), input_names=["input"], dynamo=True, verbose=False
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib[i : i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"input": x}

    quantize_static(str(src), str(dst), Reader())
    return dst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--calib", type=int, default=256)
    args = parser.parse_args()
    assert args.runs >= 30, "medians of fewer than 30 runs are too noisy to compare"
    logging.disable(logging.WARNING)
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((args.calib, 3, 224, 224), dtype=np.float32)
    x = calib[:1]

    import torchvision

    import toolchain

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "calib.npz", x=calib)
        np.savez(tmp / "val.npz", x=calib[:64])
        fp32 = torchvision.models.resnet18(weights=None).eval()
        rows.append(
            ("fp32 eager", *measure(torch_fn(fp32), x, args.warmup, args.runs), state_size(fp32), False)
        )
        tut = tutorial_int8(fp32, calib)
        rows.append(
            (
                "tutorial int8 (eager, fbgemm)",
                *measure(torch_fn(tut), x, args.warmup, args.runs),
                state_size(tut),
                False,
            )
        )
        ort_default = ort_default_int8(fp32, calib, tmp)
        rows.append(
            (
                "ort quantize_static defaults",
                *measure(ort_fn(ort_default), x, args.warmup, args.runs),
                ort_default.stat().st_size,
                False,
            )
        )

        started = time.perf_counter()
        report, folder = toolchain.build(
            "torchvision:resnet18", "x86_fbgemm", tmp / "build", tmp / "calib.npz", tmp / "val.npz"
        )
        build_s = time.perf_counter() - started
        for a in report.artifacts:
            path = folder / a.path
            if a.runtime == "onnxruntime":
                fn = ort_fn(path)
            else:
                torch.backends.quantized.engine = a.engine or torch.backends.quantized.engine
                fn = torch_fn(torch.jit.load(str(path)))
            rows.append(
                (
                    f"toolchain {a.name}" + (" (primary)" if a.primary else ""),
                    *measure(fn, x, args.warmup, args.runs),
                    a.size_bytes,
                    a.primary,
                )
            )

    print(
        f"ResNet18, batch 1, {THREADS} threads, median of {args.runs} runs after {args.warmup} warm-up; "
        f"toolchain build with {args.calib} calibration samples took {build_s:.1f} s"
    )
    print(f"{'variant':44} {'median ms':>10} {'p95 ms':>8} {'size MB':>8}")
    for name, median, p95, size, _ in rows:
        print(f"{name:44} {median:10.2f} {p95:8.2f} {size / 2**20:8.2f}")
    primary = next((r for r in rows if r[4]), None)
    others = [r for r in rows if not r[0].startswith("toolchain")]
    best = min(others, key=lambda r: r[1])
    if primary is None:
        print("no toolchain artifact passed parity")
        return 1
    ratio = primary[1] / best[1]
    print(f"primary / best other ({best[0]}): {ratio:.2f}x  -> {'OK' if ratio <= 1.0 else 'SLOWER'}")
    return 0 if ratio <= 1.05 else 1  # 5 % allows for timer noise between two equal kernels


if __name__ == "__main__":
    sys.exit(main())
