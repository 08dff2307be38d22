"""INT8 recovery against its peers, on small CNNs trained here with the failure modes real
networks have: outlier channels, depthwise convolutions with HardSwish, BatchNorm after ReLU.

For each model (digits upsampled to 1x32x32, trained seeded and single-threaded):
- accuracy on the 594 held-out digits and top-1 agreement with FP32, for
  ONNX Runtime `quantize_static` with its defaults, ONNX Runtime with the x86 profile's settings
  (U8S8, per-channel, 7-bit weights for AVX2), torch FX x86 PTQ (`get_default_qconfig_mapping`),
  NNCF's ONNX `quantize` and `quantize_with_accuracy_control` (max drop 1 pt), and the
  toolchain's x86 build with recovery (`onnx_int8`, `torch_int8`);
- batch-1 latency of every ONNX / TorchScript variant, all timed in one loop, alternating.

Run alone (nothing else on the cores): `python benchmarks/int8_recovery.py`. Needs `pip install nncf`
(not a dependency of the toolchain); without it the NNCF rows are skipped with that reason.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import toolchain  # noqa: E402
from tests.models import bn_after_relu, depthwise_hardswish  # noqa: E402  (the failure-mode tests' models)
from toolchain.examples import digits_data, train  # noqa: E402

SIZE = 32


class Outliers(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten())
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


def data():
    x_train, x_test, y_train, y_test = digits_data()
    up = lambda x: torch.nn.functional.interpolate(torch.from_numpy(x), size=(SIZE, SIZE), mode="bilinear").numpy()
    return up(x_train), up(x_test), y_train, y_test


def ort_session(path):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = 2, 1, 3
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda x: s.run(None, {name: np.ascontiguousarray(x, np.float32)})[0]


def torch_runner(module):
    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    return run


def predict(run, x):
    return np.concatenate([run(x[i:i + 64]) for i in range(0, len(x), 64)])


class Reader:
    def __init__(self, path, x):
        import onnx

        self.name = onnx.load(str(path)).graph.input[0].name
        self.x, self.i = x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 32
        return {self.name: self.x[self.i - 32:self.i]}

    def rewind(self):
        self.i = 0


def peers(fp32_onnx: Path, model: nn.Module, cal, x_test, y_test, work: Path) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    out = {}
    quantize_static(str(fp32_onnx), str(work / "ort_default.onnx"), Reader(fp32_onnx, cal), quant_format=QuantFormat.QDQ)
    out["ORT quantize_static defaults"] = ("onnx", work / "ort_default.onnx")
    quantize_static(str(fp32_onnx), str(work / "ort_x86.onnx"), Reader(fp32_onnx, cal), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    out["ORT U8S8 per-channel 7-bit (profile, no recovery)"] = ("onnx", work / "ort_x86.onnx")
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (torch.from_numpy(cal[:1]),))
    with torch.no_grad():
        for i in range(0, len(cal), 32):
            prepared(torch.from_numpy(cal[i:i + 32]))
    out["torch FX x86 PTQ (defaults)"] = ("torch", torch.jit.freeze(torch.jit.script(convert_fx(prepared))))
    try:
        import nncf
        import onnx
    except ImportError as e:
        out["NNCF"] = ("skipped", f"nncf not installed ({e})")
        return out
    proto = onnx.load(str(fp32_onnx))
    name = proto.graph.input[0].name
    calib = nncf.Dataset([cal[i:i + 1] for i in range(len(cal))], lambda x: {name: x})
    q = nncf.quantize(proto, calib)
    onnx.save(q, str(work / "nncf.onnx"))
    out["NNCF quantize (ONNX)"] = ("onnx", work / "nncf.onnx")
    val = nncf.Dataset([(x_test[i:i + 1], y_test[i]) for i in range(len(x_test))], lambda item: {name: item[0]})

    def accuracy(model, items):
        path = work / "nncf_eval.onnx"
        onnx.save(model, str(path))
        run = ort_session(path)
        return float(np.mean([run(x)[0].argmax() == y for x, y in items]))

    try:
        qa = nncf.quantize_with_accuracy_control(proto, calib, val, accuracy, max_drop=0.01)
        onnx.save(qa, str(work / "nncf_ac.onnx"))
        out["NNCF quantize_with_accuracy_control"] = ("onnx", work / "nncf_ac.onnx")
    except Exception as e:
        out["NNCF quantize_with_accuracy_control"] = ("skipped", f"{type(e).__name__}: {str(e)[:120]}")
    return out


def main():
    torch.set_num_threads(2)
    x_train, x_test, y_train, y_test = data()
    cal = x_train[:256]
    models = {
        "outlier channels": lambda: train(Outliers(), x_train, y_train, epochs=10).make_outliers(),
        "depthwise + HardSwish": lambda: train(depthwise_hardswish(), x_train, y_train, epochs=15),
        "BatchNorm after ReLU": lambda: train(bn_after_relu(), x_train, y_train, epochs=10),
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "cal.npz", x=cal)
        np.savez(tmp / "val.npz", x=x_test, y=y_test)
        for title, make in models.items():
            torch.manual_seed(0)
            model = make().eval()
            work = tmp / title.split()[0]
            work.mkdir()
            ep = torch.export.export(model, (torch.from_numpy(cal[:2]),), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=1024)},))
            torch.export.save(ep, work / "model.pt2")
            start = time.perf_counter()
            report, folder = toolchain.build(str(work / "model.pt2"), "x86_fbgemm", work / "build", tmp / "cal.npz", tmp / "val.npz")
            build_s = time.perf_counter() - start
            ref = predict(torch_runner(model), x_test)
            variants = {"FP32 (eager)": ("torch", model)}
            variants.update(peers(folder / "onnx_fp32.onnx", model, cal, x_test, y_test, work))
            for a in report.artifacts:
                if a.name in ("onnx_int8", "torch_int8"):
                    kind = "onnx" if a.runtime == "onnxruntime" else "ts"
                    label = f"toolchain {a.name} ({a.precision}{', ' + str(len(a.float_layers)) + ' float layers' if a.float_layers else ''})"
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
                rows[label] = {"accuracy": float(np.mean(out.argmax(1) == y_test)),
                               "agreement": float(np.mean(out.argmax(1) == ref.argmax(1)))}
            times = {label: [] for label in runners}
            x1 = x_test[:1].copy()
            for label in runners:
                for _ in range(20):
                    runners[label](x1)
            for _ in range(200):  # alternate the variants, so a slow moment of the machine hits all of them
                for label, run in runners.items():
                    t = time.perf_counter_ns()
                    run(x1)
                    times[label].append((time.perf_counter_ns() - t) / 1e6)
            for label in runners:
                rows[label]["latency_ms"] = float(np.median(times[label]))
            results[title] = {"build_seconds": round(build_s, 1), "rows": rows,
                              "recovery": [a.recovery["summary"] for a in report.artifacts if a.recovery]}
            print(f"\n## {title} (toolchain build {build_s:.1f} s)")
            print("| variant | accuracy | top-1 agreement | batch-1 ms |\n|---|---|---|---|")
            for label, r in rows.items():
                if "skipped" in r:
                    print(f"| {label} | skipped: {r['skipped']} | | |")
                else:
                    print(f"| {label} | {r['accuracy']:.2%} | {r['agreement']:.2%} | {r['latency_ms']:.3f} |")
            for line in results[title]["recovery"]:
                print(f"- {line}")
    Path("benchmarks/int8_recovery.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
