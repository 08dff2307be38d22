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
from toolchain.core.feed import InputSpec, Signature
from toolchain.tensorrt.engine import engine_mismatches
from toolchain.tensorrt.plan import (
    TensorRTOptions,
    activation_scales,
    cache_header,
    engine_plan,
    read_calibration_cache,
)

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def xavier(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("x") / "xavier"
    report, folder = toolchain.build(
        str(digits["model"]), "nvidia_xavier", out, digits["calibration"], digits["validation"]
    )
    return report.to_json(), folder


def test_onnx_files_are_opset_17_and_pass_the_checker(xavier):
    data, folder = xavier
    assert {a["name"] for a in data["artifacts"]} == {"onnx_fp32", "onnx_fp16", "onnx_int8_qdq"}
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
    conv_weight_dq = [
        n
        for n in qdq
        if n.op_type == "DequantizeLinear" and n.input[0] in consts and consts[n.input[1]].size > 1
    ]
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
    fp32_tensors = {t for n in onnx.load(str(folder / "onnx_fp32.onnx")).graph.node for t in n.output} | {
        "input"
    }
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
    # NV_TENSORRT_VERSION: major*1000 + minor*100 + patch up to 8.x, major*10000 + ... from 10 on
    assert cache_header("8.5.2") == "TRT-8502-EntropyCalibration2"
    assert cache_header("10.3.0") == "TRT-100300-EntropyCalibration2"
    dla = engine_plan(TensorRTOptions(dla_core=0, version="8.6.1"), [("input", (3, 8, 8), ())])
    # DLA has no dynamic dimensions: min = opt = max (TensorRT's DLA restrictions)
    assert (
        dla["input"]["min"] == dla["input"]["opt"] == dla["input"]["max"] == [8, 3, 8, 8]
        and dla["input"]["static"]
    )
    cmd = shlex.split(dla["trtexec"])
    assert dla["onnx"] == "onnx_fp32.onnx" and "--useDLACore=0" in cmd and "--allowGPUFallback" in cmd
    assert "--calib=calibration.cache" in cmd and "--builderOptimizationLevel=3" in cmd
    with pytest.raises(toolchain.ToolchainError, match="min <= opt <= max"):
        engine_plan(TensorRTOptions(profile_batch=(8, 1, 16)), [("input", (3, 8, 8), ())])


def test_engine_mismatches():
    record = {"tensorrt_version": "8.5.2.2", "gpu": "Xavier", "compute_capability": "7.2"}
    assert engine_mismatches(record, "8.5.2.2", {"gpu": "Xavier", "compute_capability": "7.2"}) == []
    problems = engine_mismatches(record, "10.3.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"})
    assert len(problems) == 3 and "built by TensorRT 8.5.2.2, this is TensorRT 10.3.0" in problems[0]


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message shown where TensorRT is missing")
def test_engine_build_without_tensorrt_is_one_clear_error(xavier):
    _, folder = xavier
    r = subprocess.run(
        [sys.executable, "-m", "toolchain", "engine", "build", str(folder)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "TensorRT is not installed here" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((folder / "report.json").read_text())["engine"]["status"] == "pending on device"


@pytest.mark.skipif(
    not HAS_TENSORRT, reason="TensorRT is not installed here (it cannot be from the package registries)"
)
def test_engine_build_run_and_check_where_tensorrt_exists(xavier):
    from toolchain.on_device import engine_build
    from toolchain.tensorrt.engine import check_engine

    _, folder = xavier
    record = engine_build(folder)
    assert record["verified"] and record["parity"]["passed"], record
    assert json.loads((folder / "report.json").read_text())["engine"]["status"] == "built"
    assert check_engine(folder / "model.engine")["ok"]


def _copy(xavier, tmp_path):
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(xavier[1], folder)
    return folder


@pytest.mark.parametrize("version", ["8.5.2.2", "10.3.0.26", "11.0.0.11"])
def test_engine_build_runs_end_to_end_on_each_tensorrt_version(xavier, tmp_path, monkeypatch, version):
    """Against the fake TensorRT (tests/fake_tensorrt.py keeps the real API's contracts): build,
    run all 32 kept inputs through a profile whose maximum batch is 16, compare, record, check."""
    from toolchain.on_device import engine_build
    from toolchain.tensorrt.engine import check_engine

    from .fake_tensorrt import install

    install(monkeypatch, version)
    folder = _copy(xavier, tmp_path)
    record = engine_build(folder)
    assert record["verified"] and record["parity"]["passed"] is True, record["parity"]
    assert record["parity"]["top1_agreement"] == 1.0 and record["tensorrt_version"] == version
    report = json.loads((folder / "report.json").read_text())
    assert (
        report["engine"]["status"] == "built" and report["passed"] is True and report["verdict"] == "PASSED"
    )
    assert report["engine"]["plan"] == "engine_plan.json"  # the plan entry is kept
    assert "TensorRT engine: built" in (folder / "report.html").read_text()  # the page follows report.json
    assert check_engine(folder / "model.engine")["ok"]


def test_a_failing_engine_fails_the_build_everywhere(xavier, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from toolchain.cli import main

    from .fake_tensorrt import install

    trt = install(monkeypatch)
    trt.fault = lambda output: output * 0.5  # the engine computes something else: SQNR 6 dB
    folder = _copy(xavier, tmp_path)
    result = CliRunner().invoke(main, ["engine", "build", str(folder)])
    assert result.exit_code == 3, result.output
    report = json.loads((folder / "report.json").read_text())
    assert report["passed"] is False and report["verdict"] == "FAILED parity"
    assert report["engine"]["parity"]["passed"] is False and "SQNR" in report["engine"]["summary"]
    markdown = (folder / "report.md").read_text()
    assert markdown.splitlines()[0].endswith(": FAILED parity") and "engine: FAILED parity: SQNR" in markdown
    assert "FAILED parity" in (folder / "report.html").read_text()


def test_engine_parity_is_taken_on_the_kept_samples(xavier, tmp_path, monkeypatch):
    """An engine whose outputs equal FP32's passes, even where the kept samples' accuracy differs
    from the full validation set's."""
    from toolchain.on_device import engine_build

    from .fake_tensorrt import install

    install(monkeypatch)
    folder = _copy(xavier, tmp_path)
    kept = dict(np.load(folder / "parity_inputs.npz"))
    predicted = kept["reference"].argmax(1)
    kept["y"] = np.where(np.arange(len(predicted)) % 2 == 0, predicted, (predicted + 1) % 10)  # 50 % accuracy
    np.savez(folder / "parity_inputs.npz", **kept)
    record = engine_build(folder)
    assert record["parity"]["passed"] is True and record["parity"]["accuracy"] == pytest.approx(0.5)


def test_a_trtexec_built_engine_is_accepted_by_the_same_tensorrt(xavier, tmp_path, monkeypatch):
    """trtexec builds record the plan's `8.5.2`; `tensorrt.__version__` says `8.5.2.2`: the same release."""
    from toolchain.on_device import engine_build
    from toolchain.tensorrt.engine import check_engine

    from .fake_tensorrt import install

    install(monkeypatch, "8.5.2.2")
    folder = _copy(xavier, tmp_path)
    engine_build(folder)
    record = json.loads((folder / "engine.json").read_text())
    record["tensorrt_version"] = "8.5.2 (expected; trtexec)"
    (folder / "engine.json").write_text(json.dumps(record))
    assert check_engine(folder / "model.engine")["ok"]
    install(monkeypatch, "8.6.1.6")
    with pytest.raises(toolchain.ToolchainError, match="built by TensorRT 8.5.2, this is TensorRT 8.6.1.6"):
        check_engine(folder / "model.engine")


@pytest.mark.parametrize("version, ok", [("8.5.2.2", True), ("10.3.0.26", True), ("11.0.0.11", False)])
def test_a_dla_engine_reads_the_calibration_cache_with_a_static_profile(
    xavier, tmp_path, monkeypatch, version, ok
):
    """DLA: the FP32 ONNX with the calibration cache (its header must name this TensorRT), one static
    batch (32 kept inputs run as 4 x 8); TensorRT 11 has no implicit-INT8 calibrators."""
    from toolchain.on_device import engine_build
    from toolchain.tensorrt.plan import write_plan

    from .fake_tensorrt import install

    install(monkeypatch, version)
    folder = _copy(xavier, tmp_path)
    write_plan(
        folder,
        TensorRTOptions(dla_core=0, version=version.rsplit(".", 1)[0]),
        Signature((InputSpec("input", (1, 8, 8)),)),
    )
    if not ok:
        with pytest.raises(toolchain.ToolchainError, match="no implicit-INT8 calibrators"):
            engine_build(folder)
        return
    record = engine_build(folder)
    assert record["parity"]["passed"] is True  # the FP32 ONNX on the fake "DLA": the same outputs


def test_a_shape_outside_the_profile_is_an_error_not_garbage(xavier, tmp_path, monkeypatch):
    from toolchain.on_device import engine_build
    from toolchain.tensorrt.engine import run_engine

    from .fake_tensorrt import install

    install(monkeypatch)
    folder = _copy(xavier, tmp_path)
    engine_build(folder)
    x = np.load(folder / "parity_inputs.npz")["x"]
    with pytest.raises(toolchain.ToolchainError, match=r"refuses input `input` of shape \(32, 1, 8, 8\)"):
        run_engine(folder / "model.engine", x, max_batch=32)  # the profile's maximum is 16


def test_layers_recovery_keeps_in_float_are_named_in_the_engine_plan(xavier, tmp_path):
    """What recovery left without Q/DQ in the engine's model reaches the plan with the precision
    TensorRT runs it in (the recovery that picks them is tested on x86's Q/DQ model in the suite,
    on Xavier nightly)."""
    from types import SimpleNamespace

    from toolchain.tensorrt.plan import plan_engine

    folder = _copy(xavier, tmp_path)
    opts = TensorRTOptions()
    built = [
        SimpleNamespace(name=name, float_layers=("fc",) if name == opts.engine_from else (), stage_facts={})
        for name in {opts.engine_from, opts.calibration_from, opts.fp32_onnx}
    ]
    engine = plan_engine(opts, built, folder, Signature((InputSpec("input", (1, 8, 8)),)))
    assert engine["status"] == "pending on device"
    plan = json.loads((folder / "engine_plan.json").read_text())
    assert plan["float_layers"]["nodes"] == ["fc"] and plan["float_layers"]["precision"] == "fp16"
    missing = plan_engine(opts, built[:1], folder, Signature((InputSpec("input", (1, 8, 8)),)))
    assert missing["status"] == "not planned" and "artifacts not built" in missing["reason"]
