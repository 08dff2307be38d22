"""Snapdragon artifacts on the host, batch 1, 2 threads: for each model, FP32 eager PyTorch
against the ExecuTorch .pte (INT8 and FP32, XNNPACK) and the lite-interpreter .ptl (qnnpack).
Latency is the build's own measurement (median of 30 runs after 5 warm-up runs, each artifact
loaded back from its file in its runtime); size is the file on disk.

    .venv/bin/python benchmarks/snapdragon_mobile.py [--models mobilenet_v2,resnet18] [--calib 64]

Weights are random (no downloads here), with BatchNorm statistics estimated on the
calibration inputs: latency and size do not depend on the weights, parity here is not judged.
The issue's targets: pte_int8 size <= 0.3x FP32, and pte_int8 faster than FP32 eager.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
MODELS = "mobilenet_v2,mobilenet_v3_small,resnet18,shufflenet_v2_x1_0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--calib", type=int, default=64, help="calibration inputs (random normal)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import toolchain

    rng = np.random.default_rng(0)
    head = (
        f"| {'model':<20} | {'FP32 eager ms':>13} | {'pte_int8 ms':>11} | {'pte_fp32 ms':>11} | "
        f"{'ptl_int8 ms':>11} | {'FP32 MB':>7} | {'pte_int8 MB':>11} | {'int8/fp32 size':>14} | "
        f"{'int8 vs eager':>13} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.npy"
        np.save(calib, rng.standard_normal((args.calib, 3, 224, 224), dtype=np.float32))
        for name in args.models.split(","):
            report, _ = toolchain.build(
                f"torchvision:{name}", "qualcomm_snapdragon", Path(tmp) / name, calib, calib
            )
            a = {x.name: x for x in report.artifacts}
            fp32_eager = report.reference["latency_ms"]
            fp32_size = a["pte_fp32"].size_bytes
            int8 = a["pte_int8"]
            print(
                f"| {name:<20} | {fp32_eager:>13.2f} | {int8.latency_ms:>11.2f} | "
                f"{a['pte_fp32'].latency_ms:>11.2f} | {a['ptl_int8'].latency_ms:>11.2f} | "
                f"{fp32_size / 1e6:>7.2f} | {int8.size_bytes / 1e6:>11.2f} | "
                f"{int8.size_bytes / fp32_size:>13.2f}x | {fp32_eager / int8.latency_ms:>12.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
