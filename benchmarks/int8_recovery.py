"""INT8 recovery against its peers, on small models trained here with the failure modes real
networks have: outlier channels, depthwise convolutions with HardSwish, BatchNorm after ReLU
(CNNs on digits upsampled to 1x32x32), and a vision transformer whose LayerNorms carry outlier
channels (8x8 digits); all trained seeded and single-threaded.

For each model:
- accuracy on the 594 held-out digits and top-1 agreement with FP32, for
  ONNX Runtime `quantize_static` with its defaults, ONNX Runtime with the x86 profile's settings
  (U8S8, per-channel, 7-bit weights for AVX2), torch FX x86 PTQ (`get_default_qconfig_mapping`),
  NNCF's ONNX `quantize` and `quantize_with_accuracy_control` (max drop 1 pt), Intel Neural
  Compressor's ONNX Runtime tuning (1 pt), and the toolchain's x86 build with recovery
  (`onnx_int8`, `torch_int8`, and the dynamic INT8 artifacts where they apply);
- batch-1 latency of every ONNX / TorchScript variant, all timed in one loop, alternating.

Run alone (nothing else on the cores):
`python benchmarks/int8_recovery.py --peers-python .venv-peers/bin/python`
(`make bench` makes that venv). NNCF and Neural
Compressor are not dependencies of the toolchain; they run in the interpreter given (see
`peers_quantize.py` for its venv: Neural Compressor's ONNX back end needs numpy < 2), and a peer
that is missing or fails is a row saying so.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import toolchain  # noqa: E402
from tests.models import bn_after_relu, depthwise_hardswish, tiny_vit, with_outlier_norms  # noqa: E402  (the tests' models)
from toolchain.inputs.examples import digits_data, train  # noqa: E402
from toolchain.measure.timing import time_alternating  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_quantize import session as ort_session  # noqa: E402  (numpy and onnxruntime only: it runs in the peers' venv too)

SIZE = 32


class Outliers(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Flatten(),
        )
        self.hidden = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.features(x))))

    def make_outliers(self):
        """Function-preserving: half of `hidden`'s channels x1e-3, the head's weights on them x1e3."""
        with torch.no_grad():
            self.hidden.weight[64:] *= 1e-3
            self.hidden.bias[64:] *= 1e-3
            self.head.weight[:, 64:] *= 1e3
        return self


def data(size: int):
    x_train, x_test, y_train, y_test = digits_data()
    if size == x_train.shape[-1]:
        return x_train, x_test, y_train, y_test
    up = lambda x: torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(size, size), mode="bilinear"
    ).numpy()
    return up(x_train), up(x_test), y_train, y_test


def int8_weight_share(path) -> float:
    """The share of Conv / Gemm / MatMul weight elements that reach their layer through a
    DequantizeLinear (stored INT8, or quantized by a QuantizeLinear of the constant: ORT folds both)
    or a dynamic INT8 kernel: what "INT8" covers in each peer's file."""
    import onnx

    graph = onnx.load(str(path)).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    # (the constant behind a weight input, whether a DequantizeLinear is on the way)
    def origin(name, seen=0):
        node = producer.get(name)
        if node is None or seen > 4:
            return name, False
        if node.op_type == "DequantizeLinear":
            return origin(node.input[0], seen + 1)[0], True
        if node.op_type in ("QuantizeLinear", "Transpose", "Reshape", "Cast"):
            return origin(node.input[0], seen + 1)
        return name, False

    total = quantized = 0
    for node in graph.node:
        dynamic = node.op_type in (
            "MatMulInteger",
            "DynamicQuantizeMatMul",
            "ConvInteger",
            "DynamicQuantizeLSTM",
        )
        if node.op_type not in ("Conv", "Gemm", "MatMul") and not dynamic:
            continue
        const, through_dq = origin(node.input[1] if len(node.input) > 1 else "")
        if const in sizes and sizes[const] > 1:
            total += sizes[const]
            quantized += sizes[const] if (through_dq or dynamic) else 0
    return quantized / total if total else 0.0


def torch_runner(module):
    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def predict(run, x):
    return np.concatenate([run(x[i : i + 64]) for i in range(0, len(x), 64)])


class Reader:
    def __init__(self, path, x):
        import onnx

        self.name = onnx.load(str(path)).graph.input[0].name
        self.x, self.i = x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 32
        return {self.name: self.x[self.i - 32 : self.i]}

    def rewind(self):
        self.i = 0


def peers(fp32_onnx: Path, model: nn.Module, cal, x_test, y_test, work: Path, peers_python: str) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    out = {}
    quantize_static(
        str(fp32_onnx), str(work / "ort_default.onnx"), Reader(fp32_onnx, cal), quant_format=QuantFormat.QDQ
    )
    out["ORT quantize_static defaults"] = ("onnx", work / "ort_default.onnx")
    quantize_static(
        str(fp32_onnx),
        str(work / "ort_x86.onnx"),
        Reader(fp32_onnx, cal),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    out["ORT U8S8 per-channel 7-bit (profile, no recovery)"] = ("onnx", work / "ort_x86.onnx")
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    try:
        prepared = prepare_fx(
            copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (torch.from_numpy(cal[:1]),)
        )
        with torch.no_grad():
            for i in range(0, len(cal), 32):
                prepared(torch.from_numpy(cal[i : i + 32]))
        out["torch FX x86 PTQ (defaults)"] = (
            "torch",
            torch.jit.freeze(torch.jit.script(convert_fx(prepared))),
        )
    except Exception as e:  # noqa: BLE001 - symbolic tracing refuses some models (a transformer's fast path)
        out["torch FX x86 PTQ (defaults)"] = ("skipped", f"{type(e).__name__}: {str(e)[:120]}")
    np.savez(work / "peer_cal.npz", x=cal)
    np.savez(work / "peer_val.npz", x=x_test, y=y_test)
    script = Path(__file__).resolve().parent / "peers_quantize.py"
    listed = work / "peers" / "peers.json"
    try:  # in the work folder: Neural Compressor writes an nc_workspace/ where it runs
        run = subprocess.run(
            [
                peers_python,
                str(script),
                str(fp32_onnx),
                str(work / "peer_cal.npz"),
                str(work / "peer_val.npz"),
                str(work / "peers"),
            ],
            capture_output=True,
            text=True,
            cwd=work,
            timeout=1800,
        )
        why = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        why = f"{type(e).__name__}: {e}"
    if not listed.exists():
        out["NNCF / INC"] = ("skipped", f"{peers_python} {script.name} failed: {why}")
        return out
    for label, result in json.loads(listed.read_text()).items():
        out[label] = (
            ("onnx", work / "peers" / result) if isinstance(result, str) else ("skipped", result["failed"])
        )
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--peers-python", default=sys.executable, help="the interpreter with nncf and neural-compressor"
    )
    parser.add_argument("--only", nargs="*", help="model titles to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    models = {  # title: (the model, trained, from the training data; the input size)
        "outlier channels": (lambda x, y: train(Outliers(), x, y, epochs=10).make_outliers(), SIZE),
        "depthwise + HardSwish": (lambda x, y: train(depthwise_hardswish(), x, y, epochs=15), SIZE),
        "BatchNorm after ReLU": (lambda x, y: train(bn_after_relu(), x, y, epochs=10), SIZE),
        "ViT with LayerNorm outliers": (lambda x, y: with_outlier_norms(tiny_vit(x, y)), 8),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for title, (make, size) in models.items():
            if args.only and title not in args.only:
                continue
            x_train, x_test, y_train, y_test = data(size)
            cal = x_train[:256]
            work = tmp / title.split()[0]
            work.mkdir()
            np.savez(work / "cal.npz", x=cal)
            np.savez(work / "val.npz", x=x_test, y=y_test)
            torch.manual_seed(0)
            model = make(x_train, y_train).eval()
            ep = torch.export.export(
                model,
                (torch.from_numpy(cal[:2]),),
                dynamic_shapes=({0: torch.export.Dim("b", min=1, max=1024)},),
            )
            torch.export.save(ep, work / "model.pt2")
            start = time.perf_counter()
            report, folder = toolchain.build(
                str(work / "model.pt2"), "x86_fbgemm", work / "build", work / "cal.npz", work / "val.npz"
            )
            build_s = time.perf_counter() - start
            ref = predict(torch_runner(model), x_test)
            variants = {"FP32 (eager)": ("torch", model)}
            variants.update(
                peers(folder / "onnx_fp32.onnx", model, cal, x_test, y_test, work, args.peers_python)
            )
            for a in report.artifacts:
                if a.name in ("onnx_int8", "torch_int8", "onnx_int8_dynamic", "torch_int8_dynamic"):
                    kind = "onnx" if a.runtime == "onnxruntime" else "ts"
                    label = (
                        f"toolchain {a.name} ({a.precision}"
                        f"{', ' + str(len(a.float_layers)) + ' float layers' if a.float_layers else ''})"
                    )
                    variants[label] = (kind, folder / a.path)
            runners, rows = {}, {}
            for label, (kind, what) in variants.items():
                if kind == "skipped":
                    rows[label] = {"skipped": what}
                    continue
                if kind == "ts":
                    torch.backends.quantized.engine = "x86"
                    runners[label] = torch_runner(torch.jit.load(str(what)))
                else:
                    runners[label] = ort_session(what) if kind == "onnx" else torch_runner(what)
                out = predict(runners[label], x_test)
                rows[label] = {
                    "accuracy": float(np.mean(out.argmax(1) == y_test)),
                    "agreement": float(np.mean(out.argmax(1) == ref.argmax(1))),
                    "int8_weights": int8_weight_share(what) if kind == "onnx" else None,
                }
            for label, ms in time_alternating(
                runners, x_test[:1].copy(), 200
            ).items():  # a slow moment hits every variant
                rows[label]["latency_ms"] = ms
            results[title] = {
                "build_seconds": round(build_s, 1),
                "rows": rows,
                "recovery": [a.recovery["summary"] for a in report.artifacts if a.recovery],
            }
            print(f"\n## {title} (toolchain build {build_s:.1f} s)")
            print(
                "| variant | accuracy | top-1 agreement | INT8 weights | batch-1 ms |\n|---|---|---|---|---|"
            )
            for label, r in rows.items():
                if "skipped" in r:
                    print(f"| {label} | skipped: {r['skipped']} | | | |")
                else:
                    share = "" if r["int8_weights"] is None else f"{r['int8_weights']:.0%}"
                    print(
                        f"| {label} | {r['accuracy']:.2%} | {r['agreement']:.2%} | {share} | "
                        f"{r['latency_ms']:.3f} |"
                    )
            for line in results[title]["recovery"]:
                print(f"- {line}")
    target = Path(__file__).resolve().parent / "int8_recovery.json"
    kept = json.loads(target.read_text()) if args.only and target.exists() else {}
    target.write_text(json.dumps(kept | results, indent=2) + "\n")


if __name__ == "__main__":
    main()
