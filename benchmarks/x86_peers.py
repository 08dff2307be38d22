"""x86: the toolchain's primary artifact against the peers' recipes on five models (issue 29, part 5).

Models: ResNet18, MobileNetV3-Large and EfficientNet-B0 at 224x224, built as `torchvision:` names
(seeded random weights, BatchNorm statistics settled on the calibration inputs: nothing can be
downloaded here, and latency does not depend on the weights; the builds say NOT JUDGED and the
peers quantize the same prepared model; SQNR still says how closely each file follows FP32), and
two trained here, so their parity means more: the tests'
vision transformer on scikit-learn's digits (dim 64, 4 heads, 3 pre-norm layers, 16 tokens) and
their LSTM classifier (2 layers, hidden 128, 24 steps) as `sequence_precisions.py` trains them.

For each model the toolchain builds `x86_fbgemm` with `runtime.isa` set to this host's (the CPU it
deploys to is this one), and the peers make their own files from the same FP32 model and
calibration data:
- `ort default`: ONNX Runtime's `quantize_static` with its defaults (QDQ, S8S8, per-tensor);
- `ort tuned`: `quant_pre_process`, then per-channel U8S8 QDQ (ONNX Runtime's x86 advice);
- `ort dynamic`: `quantize_dynamic` (ONNX Runtime's advice for transformers and RNNs; those only);
- `openvino fp32`: OpenVINO's CPU plugin on the FP32 ONNX with its defaults (BF16 on a CPU
  with AVX512-BF16 or AMX: the column `precision` says what it ran);
- `openvino qdq`: OpenVINO's CPU plugin on `ort tuned`'s Q/DQ file;
- `nncf`: NNCF's default `quantize` of the OpenVINO model, run by OpenVINO (where NNCF imports:
  in this interpreter, or `--peers-python` naming one that has it); its IR keeps the ONNX file's
  dynamic batch, as the recipe writes it (the toolchain's IRs are saved at a static batch of 1);
- `eager fbgemm`: the PyTorch tutorial's eager mode (fuse_model, fbgemm qconfig) for the
  architectures torchvision ships quantizable (ResNet18, MobileNetV3);
- `torch fx x86`: `prepare_fx`/`convert_fx` with the x86 qconfig mapping.

Each variant runs in a process of its own (one model in memory), all of them loaded at once and
idle but for their turn: the variants take turns of about a quarter of a second (at most 200 runs:
a sub-millisecond model's turn is shorter; a pause first, so that the last runtime's threads stop
spinning, and one untimed run), `--turns` turns each (default 20). A slow phase of this virtual
machine (its speed drifts by 20-40 % over minutes) then hits every variant alike: a variant's figure
is the median of its turns' medians, and each ratio is the median over the cycles of the primary's
turn over the peer's in the same cycle, with the interquartile range of those ratios and a
one-sided Wilcoxon signed-rank test of them each way: `faster`, `slower`, or `tied` when the cycles
cannot tell the two apart (p >= 0.01 both ways, as the toolchain's own race: a run makes some 40 such
comparisons). (Whole processes in turn, three times each, the earlier method, put a minute
between the figures compared: the same IR timed in two processes gave 1.85 and 2.23 ms.) Every
variant's outputs on 64 held-out inputs are compared with the FP32 model's (SQNR, top-1 agreement),
so a fast peer that lost accuracy shows it.

The primary runs on the thread count its build chose (`primary_choice.threads`, from the profile's
`race_threads`); the peers on THREADS, as their recipes run by default. Where the primary's count
differs, every peer is also timed on it (`PEER @ threads=1`): the headline ratios are against the
recipes as they run, and `primary_over_fastest_peer_any_threads` is against the fastest peer on
either count (what the file alone is worth).

ResNet18's share of the CPU's INT8 peak is computed from the ISA (INT8 multiply-accumulates per cycle
per core), the threads used and the clock; a virtual machine's /proc/cpuinfo gives the base clock, so
one core's INT8 GEMM rate (ONNX Runtime's MatMulInteger) over the ISA's MACs per cycle is taken as the
least clock the cores ran at: the peak is then a floor and the share of it a ceiling (`--clock-ghz`
with the part's boost clock gives the other end). The share of that GEMM's rate on the same cores,
timed after the turns, is given too. A model's "fastest peer" is the one the primary's per-cycle
ratio is highest against (its closest rival, not always the lowest median).

    .venv/bin/python benchmarks/x86_peers.py [--turns 20] [--models resnet18,lstm] [--peers-python P]

Run it alone (nothing else on the cores). Writes benchmarks/x86_peers.json and prints the tables
docs/benchmarks.md shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")
THREADS = 2
WARMUP = 20
TURN_S, SETTLE_S = 0.25, 0.2  # a turn's timed runs, and the pause before it
MAX_TURN_RUNS = 200
AT_THREADS = " @ threads="  # a peer timed on the primary's thread count: "ort dynamic @ threads=1"
ANSWER = "@answer "  # how a worker's answers start (anything else it prints is not one)
CNNS = {"resnet18": "resnet18", "mobilenet_v3": "mobilenet_v3_large", "efficientnet_b0": "efficientnet_b0"}
TUTORIAL = {"resnet18", "mobilenet_v3"}  # torchvision.models.quantization has these
SEQUENCE = {"vit", "lstm"}

# a one-sided Wilcoxon p below it (each way) says the primary is faster (or slower) than a peer: 0.01,
# as the toolchain's own race, since a run makes some 40 such comparisons
SAME_P = 0.01
# INT8 multiply-accumulates per cycle per core, the least a CPU with the ISA issues: AVX2 (vpmaddubsw +
# vpmaddwd on 256-bit registers: ~32), AVX-512 without VNNI (~64), one 512-bit VNNI (vpdpbusd: 64) per
# cycle as AMD Zen 4 and Intel parts with one 512-bit FMA port issue it (128 with two such ports), AMX
# (1024). A peak computed from it is a floor on the CPU's: a share of it, a ceiling on the true share
MACS_PER_CYCLE = {"avx2": 32, "avx512": 64, "avx512_vnni": 64, "avx512_bf16": 64, "amx": 1024}


# ---------------------------------------------------------------------------------------------------
# the worker: one variant, alone in this process, timed when the coordinator gives it a turn


def worker(spec_path: str) -> None:
    """Load the variant, check it against FP32, warm it up and say so (one JSON line); then for each
    line `N` on stdin run once untimed and N times timed and answer the milliseconds, until stdin ends."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec.get("threads", THREADS))
    run, precision = _runner(spec)
    data = np.load(spec["inputs"])
    x = data["x"]
    outputs = np.concatenate([np.asarray(run(x[i : i + 1])).reshape(1, -1) for i in range(len(x))])
    expected = data["expected"].reshape(len(x), -1)
    noise = float(np.sum((outputs - expected) ** 2))
    sqnr = 10 * math.log10(float(np.sum(expected**2)) / noise) if noise > 0 else float("inf")
    agreement = float(np.mean(outputs.argmax(1) == expected.argmax(1)))
    start = time.perf_counter()
    for _ in range(WARMUP):
        run(x[:1])
    warm_ms = (time.perf_counter() - start) * 1000 / WARMUP
    say = lambda obj: print(ANSWER + json.dumps(obj), flush=True)  # noqa: E731
    say({"sqnr_db": round(sqnr, 2), "top1_agreement": agreement, "precision": precision, "warm_ms": warm_ms})
    for line in sys.stdin:
        run(x[:1])
        times = []
        for _ in range(int(line)):
            start_ns = time.perf_counter_ns()
            run(x[:1])
            times.append((time.perf_counter_ns() - start_ns) / 1e6)
        say(times)


def _runner(spec):
    kind, path, threads = spec["kind"], spec.get("path"), spec.get("threads", THREADS)
    if kind == "onnxruntime":
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = (threads, 1, 3)
        session = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda x: session.run(None, {name: x})[0]), spec["precision"]
    if kind == "openvino":
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads}
        if spec.get("hint"):
            config["INFERENCE_PRECISION_HINT"] = spec["hint"]
        compiled = core.compile_model(path, "CPU", config)
        request = compiled.create_infer_request()
        ran = compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin computes floats in
        ran = ran.to_string() if hasattr(ran, "to_string") else str(ran)
        precision = spec["precision"] if spec["precision"] in ("int8", "mixed") else ran

        def run(x):
            request.infer([np.ascontiguousarray(x)])
            return np.array(request.get_output_tensor(0).data)

        return run, precision
    import torch

    if kind == "toolchain":
        from toolchain.bench import artifact_of
        from toolchain.runtimes import load_runner

        entry = spec["entry"]
        runner = load_runner(artifact_of(Path(spec["folder"]), entry), entry["runtime"], threads)
        return (lambda x: runner(x)[0]), entry["precision"]
    # the FP32 module this script pickled a minute ago, quantized here by the peer's recipe (a quantized
    # eager module does not survive pickling in torch 2.14: its fused modules lose their hooks)
    fp32 = torch.load(path, weights_only=False)
    calib = np.load(spec["calib"])["x"]
    model = {"eager fbgemm": tutorial_int8, "torch fx x86": fx_x86}[spec["recipe"]](spec, fp32, calib)

    def run_torch(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run_torch, spec["precision"]


# ---------------------------------------------------------------------------------------------------
# the models and the peers' files


def models(only: set[str] | None):
    rng = np.random.default_rng(0)
    for name, arch in CNNS.items():
        if only and name not in only:
            continue
        calib = rng.standard_normal((128, 3, 224, 224), dtype=np.float32)
        # the toolchain builds `torchvision:` names with seeded random weights, their BatchNorm
        # statistics settled on the calibration inputs (NOT JUDGED: no recovery spent on random
        # weights); the peers quantize that same model, which the build's own preparation gives
        yield (
            name,
            None,
            calib,
            rng.standard_normal((64, 3, 224, 224), dtype=np.float32),
            f"torchvision:{arch}",
        )
    if only and not (only & SEQUENCE):
        return
    from sequence_precisions import models as trained

    for name, (model, x_cal, x_val, _) in trained().items():
        name = {"transformer": "vit"}.get(name, name)
        if not only or name in only:
            yield name, model, x_cal[:256], x_val[:64], None


def export_onnx(model, x: np.ndarray, path: Path) -> Path:
    import torch

    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        model,
        (torch.from_numpy(x[:2]),),
        str(path),
        dynamo=True,
        input_names=["input"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    return path


class _Reader:
    def __init__(self, calib: np.ndarray):
        self.items = iter(calib[i : i + 1] for i in range(len(calib)))

    def get_next(self):
        x = next(self.items, None)
        return None if x is None else {"input": x}

    def rewind(self):  # onnxruntime >= 1.17 may call it
        pass


def ort_default(fp32: Path, calib, tmp: Path) -> Path:
    from onnxruntime.quantization import quantize_static

    out = tmp / "ort_default.onnx"
    quantize_static(str(fp32), str(out), _Reader(calib))
    return out


def ort_tuned(fp32: Path, calib, tmp: Path, reduce_range: bool) -> Path:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, out = tmp / "ort_pre.onnx", tmp / "ort_tuned.onnx"
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        _Reader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def ort_dynamic(fp32: Path, tmp: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / "ort_dynamic.onnx"
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    return out


NNCF_SCRIPT = """
import sys, numpy as np, nncf, openvino as ov
fp32, calib, out = sys.argv[1:4]
x = np.load(calib)["x"]
model = ov.convert_model(fp32)
data = nncf.Dataset([x[i : i + 1] for i in range(len(x))])
ov.save_model(nncf.quantize(model, data, subset_size=len(x)), out)
"""


def nncf_ir(python: str, fp32: Path, calib_npz: Path, tmp: Path) -> Path:
    out = tmp / "nncf.xml"
    r = subprocess.run(
        [python, "-c", NNCF_SCRIPT, str(fp32), str(calib_npz), str(out)], capture_output=True, text=True
    )
    if r.returncode:
        raise RuntimeError((r.stderr.strip().splitlines() or ["failed"])[-1])
    return out


def tutorial_int8(spec: dict, fp32, calib: np.ndarray):
    """The seed's recipe: torchvision's quantizable model with the FP32 model's weights, fuse_model(),
    the fbgemm qconfig, eager prepare / calibrate / convert."""
    import torch
    import torchvision

    model = getattr(torchvision.models.quantization, spec["arch"])(weights=None, quantize=False).eval()
    model.load_state_dict(fp32.state_dict())
    model.fuse_model()
    model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    torch.backends.quantized.engine = "fbgemm"
    prepared = torch.ao.quantization.prepare(model)
    with torch.inference_mode():
        for i in range(0, len(calib), 32):
            prepared(torch.from_numpy(calib[i : i + 32]))
    return torch.ao.quantization.convert(prepared)


def fx_x86(spec: dict, fp32, calib: np.ndarray):
    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(fp32, get_default_qconfig_mapping("x86"), (torch.from_numpy(calib[:1]),))
    with torch.inference_mode():
        for i in range(0, len(calib), 32):
            prepared(torch.from_numpy(calib[i : i + 32]))
    return convert_fx(prepared)


def peers(name, model, calib, folder: Path, tmp: Path, isa: str, peers_python: str | None) -> dict:
    """label -> worker spec (or the reason there is none)."""
    from toolchain.measure.cpu import safe_reduce_range

    np.savez(tmp / "calib.npz", x=calib)
    fp32 = export_onnx(model, calib, tmp / "fp32.onnx")
    out: dict[str, dict | str] = {}

    def add(label, make, **spec):
        try:
            out[label] = {"path": str(make()), **spec}
        except Exception as e:  # noqa: BLE001 - a peer that cannot make a file is reported with why
            out[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"

    add("ort default", lambda: ort_default(fp32, calib, tmp), kind="onnxruntime", precision="int8")
    add(
        "ort tuned",
        lambda: ort_tuned(fp32, calib, tmp, safe_reduce_range(isa)),
        kind="onnxruntime",
        precision="int8",
    )
    if name in SEQUENCE:
        add("ort dynamic", lambda: ort_dynamic(fp32, tmp), kind="onnxruntime", precision="int8")
    out["openvino fp32"] = {"path": str(fp32), "kind": "openvino", "precision": "fp32"}
    if isinstance(out.get("ort tuned"), dict):
        out["openvino qdq"] = {"path": out["ort tuned"]["path"], "kind": "openvino", "precision": "int8"}
    python = next(
        (p for p in (sys.executable, peers_python) if p and _imports(p, "nncf") and _imports(p, "openvino")),
        None,
    )
    if python:
        add("nncf", lambda: nncf_ir(python, fp32, tmp / "calib.npz", tmp), kind="openvino", precision="int8")
    else:
        out["nncf"] = (
            "NNCF is not installed (pip install nncf, or --peers-python naming an interpreter with it)"
        )
    import torch

    torch.save(model, tmp / "fp32_module.pt")
    torch_spec = {
        "kind": "torch",
        "calib": str(tmp / "calib.npz"),
        "precision": "int8",
        "arch": CNNS.get(name),
    }
    if name in TUTORIAL:
        out["eager fbgemm"] = {"path": str(tmp / "fp32_module.pt"), "recipe": "eager fbgemm", **torch_spec}
    out["torch fx x86"] = {"path": str(tmp / "fp32_module.pt"), "recipe": "torch fx x86", **torch_spec}
    return out


def _imports(python: str, module: str) -> bool:
    r = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
    return r.returncode == 0


# ---------------------------------------------------------------------------------------------------
# the run


def build(name, model, calib, val, source, tmp: Path, isa: str):
    """The toolchain's build for this CPU: x86_fbgemm with runtime.isa = this host's."""
    import toolchain
    from tests.models import export

    profile = tmp / "x86_host.toml"
    text = (REPO / "targets" / "x86_fbgemm.toml").read_text().replace('isa = "avx2"', f'isa = "{isa}"')
    profile.write_text(text.replace("calibration_samples = 256", f"calibration_samples = {len(calib)}"))
    np.savez(tmp / "cal.npz", x=calib)
    np.savez(tmp / "val.npz", x=val)
    if source is None:
        export(model, calib, tmp / f"{name}.pt2")
        source = str(tmp / f"{name}.pt2")
    if model is None:  # the FP32 model as the build prepares it (BatchNorm settled on these inputs)
        from toolchain.inputs.load import load_model
        from toolchain.inputs.prepare import prepare_model
        from toolchain.target import load_target

        target = load_target(str(profile))
        prepared, _, _ = prepare_model(
            load_model(source), target.data, isa, tmp / "cal.npz", tmp / "val.npz", None
        )
        model = prepared.artifact.model
    started = time.perf_counter()
    report, folder = toolchain.build(source, str(profile), tmp / "build", tmp / "cal.npz", tmp / "val.npz")
    return report.to_json(), folder, time.perf_counter() - started, model


def measure(specs: dict, turns: int) -> dict:
    """label -> {"check": the worker's accuracy line, "turns": [[ms, ...], ...]}; every variant in a
    process of its own, all loaded, taking turns (the first to go moves each cycle)."""
    workers: dict[str, tuple[subprocess.Popen, dict]] = {}
    errors: dict[str, str] = {}
    logs = {label: Path(spec["spec_file"]).with_suffix(".log") for label, spec in specs.items()}
    results: dict[str, dict] = {}
    started: list[subprocess.Popen] = []
    try:
        for label, spec in specs.items():  # loaded one after another: nothing is timed yet
            with logs[label].open("w") as log:  # stderr to a file: a pipe nobody reads fills and blocks
                p = subprocess.Popen(
                    [sys.executable, __file__, "--worker", spec["spec_file"]],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
            started.append(p)
            first = _answer(p)
            if first is None:
                errors[label] = _last_line(logs[label], p)
                continue
            workers[label] = (p, first)
        runs = {
            label: max(3, min(MAX_TURN_RUNS, round(TURN_S * 1000 / max(c["warm_ms"], 1e-3))))
            for label, (_, c) in workers.items()
        }
        results = {label: {"check": c, "turns": []} for label, (_, c) in workers.items()}
        order = list(workers)
        for cycle in range(turns):
            for label in order[cycle % len(order) :] + order[: cycle % len(order)]:
                if label in errors:
                    continue
                p = workers[label][0]
                time.sleep(SETTLE_S)
                p.stdin.write(f"{runs[label]}\n")
                p.stdin.flush()
                times = _answer(p)
                if times is None:
                    errors[label] = _last_line(logs[label], p)
                    continue
                results[label]["turns"].append(times)
    finally:
        for p in started:  # the end of its stdin ends a worker
            p.stdin.close()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return {"results": {k: v for k, v in results.items() if k not in errors}, "errors": errors}


def _last_line(log: Path, p: subprocess.Popen) -> str:
    p.kill()
    p.wait()
    lines = log.read_text(errors="replace").strip().splitlines()
    return (lines or [f"exit {p.returncode}"])[-1][:200]


def _answer(p: subprocess.Popen):
    """The worker's next JSON line (other output skipped), or None when it exited."""
    for line in p.stdout:
        if line.startswith(ANSWER):
            return json.loads(line[len(ANSWER) :])
    return None


def int8_peak(isa: str, threads: int, clock_ghz: tuple[float, float]) -> tuple[float, float]:
    per_cycle = MACS_PER_CYCLE[isa] * threads
    return per_cycle * clock_ghz[0] * 1e9, per_cycle * clock_ghz[1] * 1e9


def int8_gemm_gmacs(threads: int, n: int = 1024) -> float:
    """What this CPU's INT8 units deliver at their best: ONNX Runtime's MatMulInteger (MLAS's u8s8
    kernel: VNNI where the CPU has it) on an n x n x n product, median of 9 runs, in GMAC/s."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.integers(-128, 128, (n, n), dtype=np.int8), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])],
        "gemm",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.log_severity_level = threads, 3
    session = ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"])
    a = {"A": rng.integers(0, 256, (n, n), dtype=np.uint8)}
    for _ in range(3):
        session.run(None, a)
    seconds = []
    for _ in range(9):
        start = time.perf_counter()
        session.run(None, a)
        seconds.append(time.perf_counter() - start)
    return n**3 / float(np.median(seconds)) / 1e9


def host_clock_ghz() -> tuple[float, float]:
    """(base, highest) in GHz: the kernel's cpufreq limits where it exposes them, else the clock
    /proc/cpuinfo reports (a virtual machine often shows one figure)."""
    base = Path("/sys/devices/system/cpu/cpu0/cpufreq")
    try:
        low = int((base / "base_frequency").read_text()) / 1e6
        high = int((base / "cpuinfo_max_freq").read_text()) / 1e6
        return low, high
    except (OSError, ValueError):
        mhz = [
            float(line.split(":")[1])
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("cpu MHz")
        ]
        return (min(mhz) / 1e3, max(mhz) / 1e3) if mhz else (float("nan"), float("nan"))


def summary(result: dict) -> dict:
    med = [float(np.median(t)) for t in result["turns"]]
    every = np.concatenate(result["turns"])
    check = result["check"]
    return {
        "median_ms": float(np.median(med)),
        "p25_ms": float(np.percentile(every, 25)),
        "p75_ms": float(np.percentile(every, 75)),
        "turns": len(med),
        "runs": int(every.size),
        "sqnr_db": check["sqnr_db"],
        "top1_agreement": check["top1_agreement"],
        "precision": check["precision"],
    }


def ratio(primary: dict, peer: dict) -> dict:
    """The primary's turn median over the peer's in the same cycle: median and quartiles over cycles,
    and whether the cycles tell them apart: one-sided Wilcoxon signed-rank tests of the log ratios
    against 0, each way (``faster`` or ``slower`` at p < SAME_P, else ``tied``: a ratio a few percent
    from 1 with p above it is a different number in the next run, the earlier runs' ties show). ``p``
    is the smaller of the two; the per-cycle ratios are kept."""
    per_cycle = [float(np.median(a)) / float(np.median(b)) for a, b in zip(primary["turns"], peer["turns"])]
    q1, med, q3 = np.percentile(per_cycle, [25, 50, 75])
    p_faster, p_slower = _wilcoxon(np.log(per_cycle), "less"), _wilcoxon(np.log(per_cycle), "greater")
    verdict = "faster" if p_faster < SAME_P else "slower" if p_slower < SAME_P else "tied"
    return {
        "ratio": round(float(med), 3),
        "iqr": [round(float(q1), 3), round(float(q3), 3)],
        "p": min(p_faster, p_slower),
        "verdict": verdict,
        "per_cycle": [round(r, 4) for r in per_cycle],
    }


def _wilcoxon(log_ratios: np.ndarray, alternative: str) -> float:
    """One-sided Wilcoxon signed-rank p; 1.0 where it cannot say (too few cycles, all ratios 1)."""
    from scipy.stats import wilcoxon

    if len(log_ratios) < 6 or not np.any(log_ratios):
        return 1.0
    p = float(wilcoxon(log_ratios, alternative=alternative).pvalue)
    return p if np.isfinite(p) else 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--turns", type=int, default=20, help="turns each variant is timed in")
    parser.add_argument("--models", help="comma-separated subset of " + ", ".join([*CNNS, *SEQUENCE]))
    parser.add_argument("--peers-python", help="an interpreter with NNCF and OpenVINO (e.g. .venv-peers)")
    parser.add_argument("--clock-ghz", type=float, nargs=2, help="the CPU's base and boost clock")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    logging.disable(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    import torch

    from toolchain.measure.cpu import host_cpu

    torch.set_num_threads(THREADS)
    cpu = host_cpu()
    isa = cpu["isa"] or "avx2"
    clock = tuple(args.clock_ghz) if args.clock_ghz else host_clock_ghz()
    only = set(args.models.split(",")) if args.models else None
    results = {
        "host": cpu,
        "threads": THREADS,
        "turns": args.turns,
        "turn_s": TURN_S,
        "clock_ghz": clock,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, calib, val, source in models(only):
            work = Path(tmp) / name
            work.mkdir()
            print(f"{name}: building", file=sys.stderr, flush=True)
            report, folder, build_s, model = build(name, model, calib, val, source, work, isa)
            primary = next((a for a in report["artifacts"] if a["primary"]), None)
            if primary is None:
                results["models"][name] = {"error": "no toolchain artifact passed parity", "report": report}
                continue
            import torch

            with torch.inference_mode():
                expected = model(torch.from_numpy(val)).numpy()
            np.savez(work / "inputs.npz", x=val, expected=expected)
            print(f"{name}: the peers' files", file=sys.stderr, flush=True)
            # the primary on the thread count its build chose (primary_choice.threads); where that is not
            # the recipes' THREADS, every peer is timed on it too (AT_THREADS): what the file alone is worth
            threads = (report.get("primary_choice") or {}).get("threads") or THREADS
            specs = {
                f"toolchain {primary['name']} (primary{_on(threads)})": {
                    "kind": "toolchain",
                    "folder": str(folder),
                    "entry": primary,
                    "threads": threads,
                }
            }
            made = peers(name, model, calib, folder, work, isa, args.peers_python)
            specs.update({k: v for k, v in made.items() if isinstance(v, dict)})
            if threads != THREADS:
                specs.update(
                    {
                        f"{k}{AT_THREADS}{threads}": {**v, "threads": threads}
                        for k, v in made.items()
                        if isinstance(v, dict)
                    }
                )
            for i, (label, spec) in enumerate(specs.items()):
                spec["inputs"] = str(work / "inputs.npz")
                spec["spec_file"] = str(work / f"spec{i}.json")
                Path(spec["spec_file"]).write_text(json.dumps(spec))
            print(
                f"{name}: timing {len(specs)} variants, {args.turns} turns each", file=sys.stderr, flush=True
            )
            measured = measure(specs, args.turns)
            results_by = measured["results"]
            rows = {label: summary(r) for label, r in results_by.items() if r["turns"]}
            top = next(iter(specs))
            ratios = (
                {label: ratio(results_by[top], results_by[label]) for label in rows if label != top}
                if top in rows
                else {}
            )
            entry = {
                "build_s": round(build_s, 1),
                "verdict": report["verdict"],
                "primary": primary["name"],
                "primary_threads": threads,
                "primary_choice": report.get("primary_choice"),
                "variants": rows,
                "primary_over_peer": {k: v["ratio"] for k, v in ratios.items()},
                "primary_over_peer_iqr": {k: v["iqr"] for k, v in ratios.items()},
                "primary_vs_peer": {k: v["verdict"] for k, v in ratios.items()},
                "primary_vs_peer_p": {k: round(v["p"], 4) for k, v in ratios.items()},
                "primary_over_peer_per_cycle": {k: v["per_cycle"] for k, v in ratios.items()},
                "missing": {**{k: v for k, v in made.items() if isinstance(v, str)}, **measured["errors"]},
            }
            if name == "resnet18" and top in rows:
                from toolchain.passes.onnx_share import onnx_int8_share

                macs = onnx_int8_share(work / "fp32.onnx", [(1, 3, 224, 224)])["macs"]
                # a VM does not show its running clock (/proc/cpuinfo gives the base): one core's INT8
                # GEMM rate over the ISA's MACs per cycle is the least clock that rate needs
                gemm_one, gemm = int8_gemm_gmacs(1), int8_gemm_gmacs(threads)
                implied = gemm_one / MACS_PER_CYCLE[isa]
                running = (max(clock[0], implied), max(clock[1], implied))
                low, high = int8_peak(isa, threads, running)
                achieved = macs / (rows[top]["median_ms"] / 1e3)
                entry["int8_peak"] = {
                    "macs": macs,
                    "isa": isa,
                    "macs_per_cycle_per_core": MACS_PER_CYCLE[isa],
                    "threads": threads,
                    "reported_clock_ghz": list(clock),
                    "gemm_gmacs_one_thread": round(gemm_one, 1),
                    "gemm_gmacs": round(gemm, 1),
                    "implied_clock_ghz": round(implied, 2),
                    "peak_gmacs": [round(low / 1e9, 1), round(high / 1e9, 1)],
                    "achieved_gmacs": round(achieved / 1e9, 1),
                    "share_of_peak": [round(achieved / high, 3), round(achieved / low, 3)],
                    "share_of_gemm": round(achieved / 1e9 / gemm, 3),
                }
            results["models"][name] = entry
            print(table(name, entry), flush=True)
    measured = {n: e for n, e in results["models"].items() if "variants" in e}
    # against the peers as their recipes run them, and against the fastest on either thread count
    overs = {
        suffix: {n: _over_fastest(e, suffix != "") for n, e in measured.items()}
        for suffix in ("", "_any_threads")
    }
    for suffix, over in overs.items():
        results[f"primary_over_fastest_peer{suffix}"] = {n: round(v, 3) for n, v in over.items()}
        results[f"geomean_primary_over_fastest_peer{suffix}"] = (
            float(np.exp(np.mean(np.log(list(over.values()))))) if over else None
        )
    behind = list(overs[""].values())  # the headline: the peers as their recipes run them
    # the peers the cycles say are faster than the primary (one-sided Wilcoxon p < SAME_P), run as
    # their recipes run them
    results["peers_measurably_faster"] = {
        n: [k for k, v in e["primary_vs_peer"].items() if v == "slower" and AT_THREADS not in k]
        for n, e in measured.items()
    }
    (HERE / "x86_peers.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(
        "\nprimary / fastest peer: "
        + ", ".join(f"{n} {v:.2f}" for n, v in results["primary_over_fastest_peer"].items())
    )
    if behind:
        print(f"geometric mean over {len(behind)} models: {results['geomean_primary_over_fastest_peer']:.3f}")
        slower = {n: v for n, v in results["peers_measurably_faster"].items() if v}
        print(
            "peers measurably faster than the primary: "
            + ("; ".join(f"{n}: {', '.join(v)}" for n, v in slower.items()) if slower else "none")
        )
        print(
            "with the peers also on the primary's threads: "
            + ", ".join(f"{n} {v:.2f}" for n, v in results["primary_over_fastest_peer_any_threads"].items())
            + f"; geometric mean {results['geomean_primary_over_fastest_peer_any_threads']:.3f}"
        )
    return 0 if behind and len(behind) == len(results["models"]) and max(behind) <= 1.0 else 1


def _over_fastest(entry: dict, any_threads: bool = False) -> float:
    """The primary's turns over the fastest peer's, cycle by cycle (peers that lost accuracy included:
    the table shows their SQNR): the peers as their recipes run them (THREADS), or ``any_threads``
    with them on the primary's thread count too."""
    return max(
        (v for k, v in entry["primary_over_peer"].items() if any_threads or AT_THREADS not in k),
        default=float("nan"),
    )


def _on(threads: int) -> str:
    return "" if threads == THREADS else f", {threads} thread{'s' if threads > 1 else ''}"


def _span(low, high, form: str) -> str:
    """One figure where a range's ends are the same, else the range."""
    low, high = form.format(low), form.format(high)
    return low if low == high else f"{low}-{high}"


def table(name: str, entry: dict) -> str:
    lines = [
        f"\n{name} ({entry['verdict']}; built in {entry['build_s']} s)",
        "| variant | precision | batch-1 median ms (p25-p75) | primary / variant (IQR), Wilcoxon p "
        "| SQNR vs FP32 | top-1 agr. |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in sorted(entry["variants"].items(), key=lambda kv: kv[1]["median_ms"]):
        over = entry["primary_over_peer"].get(label)
        iqr = entry["primary_over_peer_iqr"].get(label)
        p, verdict = entry["primary_vs_peer_p"].get(label), entry["primary_vs_peer"].get(label)
        cell = "" if over is None else f"{over:.2f} ({iqr[0]:.2f}-{iqr[1]:.2f}), p {p:.2g}: {verdict}"
        lines.append(
            f"| {label} | {r['precision']} | {r['median_ms']:.3f} ({r['p25_ms']:.3f}-{r['p75_ms']:.3f}) | "
            f"{cell} | {r['sqnr_db']:.1f} dB | {r['top1_agreement']:.1%} |"
        )
    for label, why in entry["missing"].items():
        lines.append(f"| {label} | not measured: {why} | | | | |")
    peak = entry.get("int8_peak")
    if peak:
        lines.append(
            f"\nResNet18: {peak['macs'] / 1e9:.2f} GMAC per image; the primary reaches "
            f"{peak['achieved_gmacs']} GMAC/s. INT8 peak ({peak['isa']}): at least "
            f"{peak['macs_per_cycle_per_core']} MAC/cycle/core x {peak['threads']} cores x the clock, which "
            f"/proc/cpuinfo gives as {_span(*peak['reported_clock_ghz'], '{:.2f}')} GHz and one core's INT8 "
            f"GEMM ({peak['gemm_gmacs_one_thread']} GMAC/s) puts at {peak['implied_clock_ghz']} GHz or "
            f"more: {_span(*peak['peak_gmacs'], '{}')} GMAC/s or more, so at most "
            f"{_span(*peak['share_of_peak'], '{:.0%}')} of peak (--clock-ghz BASE BOOST for a range); "
            f"{peak['share_of_gemm']:.0%} of ONNX Runtime's INT8 GEMM on the same cores "
            f"({peak['gemm_gmacs']} GMAC/s, timed after the turns)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
