"""The Hexagon NPU artifact of ResNet18- and MobileNet-class models: context size, host parity and
build time. Each torchvision architecture is trained here on digits (3x32x32, seeded, 4 epochs;
8 for MobileNetV2) and built for the shipped `qualcomm_snapdragon` profile with only `qnn_int8`
(INT8 HTP context for the 8 Gen 2, `htp_arch = 73`), its outputs checked against FP32 on the
profile's 128 of 512 held-out digits through the HTP library on this x86 host (host HTP emulation). Needs
onnxruntime-qnn (`pip install 'toolchain[qnn]'`). Run alone: `python benchmarks/snapdragon_npu.py`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCHITECTURES = {"resnet18": 4, "mobilenet_v2": 8, "mobilenet_v3_small": 4}


def profile(folder: Path) -> Path:
    """The shipped `qualcomm_snapdragon` with its `qnn_int8` alone: 512 validation inputs, judged on the
    profile's `parity_samples` (128) through the emulator, one at a time (the context is batch 1)."""
    import re
    import tomllib

    text = (ROOT / "targets" / "qualcomm_snapdragon.toml").read_text()
    for name in tomllib.loads(text)["artifacts"]:
        if name != "qnn_int8":
            text = re.sub(rf"\[artifacts\.{name}\]\n(?:[^\[\n].*\n)*", "", text)
    path = folder / "npu.toml"
    path.write_text(text)
    return path


def per_input_seconds(folder: Path, a) -> float:
    """Median seconds of one emulated inference, timed apart from the build."""
    from toolchain.core.artifact import Artifact, Kind
    from toolchain.runtimes import get

    run = get("qnn").load(Artifact(Kind.ONNX, "int8", path=folder / a.path), 1)
    x = np.zeros((1, 3, 32, 32), np.float32)
    run(x)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    import torch

    import toolchain
    from toolchain.inputs.examples import digits_data, digits_rgb, train_torchvision

    x_train, x_test, y_train, y_test = digits_data()
    xtr, xte = digits_rgb(x_train), digits_rgb(x_test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "cal.npz", x=xtr[:128])
        np.savez(tmp / "val.npz", x=xte, y=y_test)
        for name, epochs in ARCHITECTURES.items():
            model = train_torchvision(name, xtr, y_train, epochs=epochs)
            ep = torch.export.export(
                model,
                (torch.from_numpy(xtr[:2]),),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
            )
            torch.export.save(ep, str(tmp / f"{name}.pt2"))
            start = time.perf_counter()
            report, folder = toolchain.build(
                str(tmp / f"{name}.pt2"), str(profile(tmp)), tmp / name, tmp / "cal.npz", tmp / "val.npz"
            )
            seconds = time.perf_counter() - start
            a = report.artifacts[0]
            facts = a.stage_facts["compile_qnn"]
            rows.append((name, report.reference["accuracy"], a, facts, seconds, per_input_seconds(folder, a)))
    print(
        f"parity on {rows[0][2].parity.samples} of {report.data['validation']['samples']} validation inputs"
    )
    print(
        "| model | FP32 accuracy | qnn_int8 accuracy | top-1 agreement | SQNR dB | context MB | file MB | "
        "other nodes | parity | s per emulated input | build s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, fp32, a, facts, seconds, one in rows:
        p = a.parity
        print(
            f"| {name} | {fp32:.2%} | {p.accuracy:.2%} | {p.top1_agreement:.2%} | "
            f"{p.sqnr_db:.1f} | {facts['context_bytes'] / 2**20:.2f} | {a.size_bytes / 2**20:.2f} | "
            f"{facts.get('other_nodes') or 'none'} | {'pass' if p.passed else 'FAIL'} | "
            f"{one:.3f} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
