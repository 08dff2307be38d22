"""FP32, FP16, BF16, dynamic INT8 and static INT8 for a transformer and an LSTM, on this machine.

Models, trained here seeded (no downloads), larger than the tests' (whose builds must stay
cheap): the tests' vision transformer architecture on scikit-learn's digits at dim 64, 4 heads,
3 pre-norm layers with GELU (2x2 patches -> 16 tokens), and their LSTM classifier with 2 layers,
hidden 128, over 24-step synthetic sequences whose class is an oscillation's frequency.

Each is built by the toolchain for `x86_fbgemm` with `runtime.isa = "amx"` (so the BF16
artifact applies; on a host without AVX512-BF16 / AMX its latency is emulation and the table
says so) and for `nvidia_xavier` (its FP16 ONNX). Then every artifact file is loaded once and
timed at batch 1 in one loop, alternating between them, 2 threads, so a disturbance hits all
alike; the table reports medians, each relative to FP32 ONNX, sizes, and each artifact's parity
from its build. Run alone (nothing else on the cores): `python benchmarks/sequence_precisions.py`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import toolchain  # noqa: E402
from tests.models import SequenceClassifier, TinyViT, export, sequences  # noqa: E402
from toolchain.inputs.examples import digits_data, train  # noqa: E402
from toolchain.measure.cpu import host_cpu, host_has_bf16  # noqa: E402
from toolchain.measure.timing import time_alternating  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ROUNDS, THREADS = 300, 2


def models():
    x_train, x_test, y_train, y_test = digits_data()
    torch.manual_seed(0)
    vit = train(TinyViT(dim=64, heads=4, layers=3), x_train, y_train, epochs=30)
    s_train, y_strain = sequences(3000, seed=0, steps=24)
    s_test, y_stest = sequences(512, seed=1, steps=24)
    torch.manual_seed(0)
    lstm = train(SequenceClassifier(hidden=128, layers=2), s_train, y_strain, epochs=15)
    return {"transformer": (vit, x_train, x_test, y_test), "lstm": (lstm, s_train, s_test, y_stest)}


def build_all(name, model, x_cal, x_val, y_val, tmp: Path):
    export(model, x_cal, tmp / f"{name}.pt2")
    np.savez(tmp / "cal.npz", x=x_cal[:256])
    np.savez(tmp / "val.npz", x=x_val, y=y_val)
    amx = tmp / "x86_amx.toml"
    amx.write_text((REPO / "targets" / "x86_fbgemm.toml").read_text().replace('isa = "avx2"', 'isa = "amx"'))
    # the FP32 model itself: not an artifact, never "fastest passing"
    out = {
        "fp32 reference": {
            "file": tmp / f"{name}.pt2",
            "runtime": "torch.export",
            "precision": "fp32",
            "size_bytes": (tmp / f"{name}.pt2").stat().st_size,
            "passed": None,
            "top1_agreement": 1.0,
            "sqnr_db": None,
        }
    }
    for target in (str(amx), "nvidia_xavier"):
        report, folder = toolchain.build(
            str(tmp / f"{name}.pt2"),
            target,
            tmp / f"{name}-{Path(target).stem}",
            tmp / "cal.npz",
            tmp / "val.npz",
        )
        for a in report.to_json()["artifacts"]:
            if target == "nvidia_xavier" and a["name"] != "onnx_fp16":
                continue
            out[a["name"]] = {
                "file": folder / a["path"],
                "runtime": a["runtime"],
                "precision": a["precision"],
                "size_bytes": a["size_bytes"],
                "passed": a["parity"]["passed"],
                "top1_agreement": a["parity"]["top1_agreement"],
                "sqnr_db": a["parity"]["sqnr_db"],
            }
    return out


def runner(entry):
    if entry["runtime"] == "torch.export":
        model = torch.export.load(str(entry["file"])).module()
        return lambda x: model(torch.from_numpy(x))
    if entry["runtime"] == "torchscript":
        model = torch.jit.load(str(entry["file"])).eval()
        return lambda x: model(torch.from_numpy(x))
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(str(entry["file"]), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})


def latencies(entries, x):
    torch.set_num_threads(THREADS)
    with torch.inference_mode():
        return time_alternating({k: runner(v) for k, v in entries.items()}, x, ROUNDS)


def main():
    results = {
        "host": host_cpu(),
        "host_has_bf16": host_has_bf16(),
        "rounds": ROUNDS,
        "threads": THREADS,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, x_cal, x_val, y_val) in models().items():
            folder = Path(tmp) / name
            folder.mkdir()
            entries = build_all(name, model, x_cal, x_val, y_val, folder)
            latency = latencies(entries, x_val[:1])
            base = latency.get("onnx_fp32") or latency["fp32 reference"]
            passing = [k for k, v in entries.items() if v["passed"] is True]
            fastest = min(passing, key=latency.get) if passing else None
            results["models"][name] = {
                k: {
                    **{f: v[f] for f in v if f != "file"},
                    "p50_ms": round(latency[k], 4),
                    "vs_onnx_fp32": round(latency[k] / base, 2),
                    "fastest_passing": k == fastest,
                }
                for k, v in entries.items()
            }
    (Path(__file__).with_suffix(".json")).write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"host: {results['host']['model']} ({results['host']['isa']}, "
        f"BF16 {'native' if results['host_has_bf16'] else 'emulated'})"
    )
    for name, rows in results["models"].items():
        print(
            f"\n{name}\n| artifact | precision | size | batch-1 p50 (ms) | vs onnx_fp32 | "
            "top-1 agr. | SQNR | parity |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for k, r in sorted(rows.items(), key=lambda kv: kv[1]["p50_ms"]):
            mark = " **fastest passing**" if r["fastest_passing"] else ""
            sqnr = "" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f} dB"
            verdict = {True: "pass", False: "FAIL", None: ""}[r["passed"]]
            print(
                f"| `{k}`{mark} | {r['precision']} | {r['size_bytes'] / 1e6:.3f} MB | {r['p50_ms']:.3f} | "
                f"{r['vs_onnx_fp32']:.2f}x | {r['top1_agreement']:.2%} | {sqnr} | {verdict} |"
            )


if __name__ == "__main__":
    main()
