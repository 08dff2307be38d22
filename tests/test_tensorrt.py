"""NVIDIA Xavier: TensorRT-ready ONNX, calibration cache and plan here; engines where TensorRT exists."""

import importlib.util
import json
import shlex
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import toolchain
from toolchain.tensorrt.engine import engine_mismatches
from toolchain.tensorrt.plan import TensorRTOptions, activation_scales, cache_header, engine_plan, read_calibration_cache

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def xavier(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("x") / "xavier"
    report, folder = toolchain.build(str(digits["model"]), "nvidia_xavier", out, digits["calibration"], digits["validation"])
    return report.to_json(), folder


def test_onnx_files_are_opset_17_and_pass_the_checker(xavier):
    data, folder = xavier
    assert {a["name"] for a in data["artifacts"]} == {"onnx_fp32", "onnx_int8_qdq"}
    for a in data["artifacts"]:
        model = onnx.load(str(folder / a["path"]))
        onnx.checker.check_model(model, full_check=True)
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_every_qdq_zero_point_is_zero_and_weights_per_channel(xavier):
    _, folder = xavier
    graph = onnx.load(str(folder / "onnx_int8_qdq.onnx")).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        assert len(node.input) == 3 and not np.any(consts[node.input[2]]), node.name
    conv_weight_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in consts and consts[n.input[1]].size > 1]
    assert conv_weight_dq, "weights should carry one scale per output channel"
    assert all(n.op_type != "QuantizeLinear" or n.input[0] != graph.output[0].name for n in qdq)


def test_proxy_parity_on_onnxruntime(xavier):
    data, _ = xavier
    assert data["passed"] is True
    qdq = next(a for a in data["artifacts"] if a["name"] == "onnx_int8_qdq")
    assert qdq["primary"] and qdq["parity"]["passed"] and qdq["parity"]["top1_agreement"] >= 0.99
    assert data["reference"]["accuracy"] - qdq["parity"]["accuracy"] <= 0.01


def test_calibration_cache_parses_back_to_the_scales_used(xavier):
    _, folder = xavier
    header, cached = read_calibration_cache(folder / "calibration.cache")
    assert header == "TRT-8502-EntropyCalibration2"
    used = activation_scales(folder / "onnx_int8_qdq.onnx")
    assert cached.keys() == used.keys() and len(used) >= 4
    assert all(np.float32(cached[k]) == np.float32(v) for k, v in used.items())
    fp32_tensors = {t for n in onnx.load(str(folder / "onnx_fp32.onnx")).graph.node for t in n.output} | {"input"}
    assert set(cached) <= fp32_tensors, "the cache must name tensors of the FP32 ONNX it is used with"


def test_engine_plan_and_report_never_claim_an_engine(xavier):
    data, folder = xavier
    plan = json.loads((folder / "engine_plan.json").read_text())
    assert (plan["input"]["min"][0], plan["input"]["opt"][0], plan["input"]["max"][0]) == (1, 8, 16)
    assert plan["tensorrt_version"] == "8.5.2" and plan["builder_optimization_level"] is None  # 8.6+ only
    cmd = shlex.split(plan["trtexec"])
    assert cmd[:4] == ["trtexec", "--onnx=onnx_int8_qdq.onnx", "--fp16", "--int8"]
    assert "--minShapes=input:1x1x8x8" in cmd and "--maxShapes=input:16x1x8x8" in cmd
    assert data["engine"]["status"] == "pending on device" and data["engine"]["verified"] is False
    assert not (folder / "model.engine").exists()
    kept = np.load(folder / "parity_inputs.npz")
    assert kept["x"].shape[0] == kept["reference"].shape[0] == 32


def test_plan_variants():
    assert cache_header("10.3.0") == "TRT-10300-EntropyCalibration2"
    dla = engine_plan(TensorRTOptions(dla_core=0, version="8.6.1"), "input", (3, 8, 8))
    cmd = shlex.split(dla["trtexec"])
    assert dla["onnx"] == "onnx_fp32.onnx" and "--useDLACore=0" in cmd and "--allowGPUFallback" in cmd
    assert "--calib=calibration.cache" in cmd and "--builderOptimizationLevel=3" in cmd
    with pytest.raises(toolchain.ToolchainError, match="min <= opt <= max"):
        engine_plan(TensorRTOptions(profile_batch=(8, 1, 16)), "input", (3, 8, 8))


def test_engine_mismatches():
    record = {"tensorrt_version": "8.5.2.2", "gpu": "Xavier", "compute_capability": "7.2"}
    assert engine_mismatches(record, "8.5.2.2", {"gpu": "Xavier", "compute_capability": "7.2"}) == []
    problems = engine_mismatches(record, "10.3.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"})
    assert len(problems) == 3 and "built by TensorRT 8.5.2.2, this is TensorRT 10.3.0" in problems[0]


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where TensorRT is missing")
def test_engine_build_without_tensorrt_is_one_clear_error(xavier):
    _, folder = xavier
    r = subprocess.run([sys.executable, "-m", "toolchain", "engine", "build", str(folder)], capture_output=True, text=True)
    assert r.returncode == 2 and "TensorRT is not installed here" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((folder / "report.json").read_text())["engine"]["status"] == "pending on device"


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed here (it cannot be from the package registries)")
def test_engine_build_run_and_check_where_tensorrt_exists(xavier):
    from toolchain.tensorrt.device import engine_build
    from toolchain.tensorrt.engine import check_engine

    _, folder = xavier
    record = engine_build(folder)
    assert record["verified"] and record["parity"]["passed"], record
    assert json.loads((folder / "report.json").read_text())["engine"]["status"] == "built"
    assert check_engine(folder / "model.engine")["ok"]


def test_engine_parity_compares_on_the_kept_samples(xavier, tmp_path, monkeypatch):
    """`engine build`'s bookkeeping, with TensorRT's build and run stubbed: an engine whose outputs
    equal FP32's passes, even where the kept samples' accuracy differs from the full validation set's."""
    import shutil

    from toolchain.tensorrt import device
    from toolchain.tensorrt import engine as trt_engine

    folder = tmp_path / "b"
    shutil.copytree(xavier[1], folder)
    kept = dict(np.load(folder / "parity_inputs.npz"))
    predicted = kept["reference"].argmax(1)
    kept["y"] = np.where(np.arange(len(predicted)) % 2 == 0, predicted, (predicted + 1) % 10)  # 50 % accuracy
    np.savez(folder / "parity_inputs.npz", **kept)
    monkeypatch.setattr(trt_engine, "build_engine", lambda f: {"engine": "model.engine", "tensorrt_version": "stub"})
    monkeypatch.setattr(trt_engine, "run_engine", lambda path, x: kept["reference"][: len(x)])
    record = device.engine_build(folder)
    assert record["verified"] and record["parity"]["passed"] is True, record["parity"]
    assert record["parity"]["accuracy"] == pytest.approx(0.5)
    report = json.loads((folder / "report.json").read_text())
    assert report["engine"]["status"] == "built" and report["engine"]["parity"]["passed"] is True
    assert report["engine"]["plan"] == "engine_plan.json"  # the plan entry is kept
    assert "TensorRT engine: built" in (folder / "report.html").read_text()  # the page follows report.json
