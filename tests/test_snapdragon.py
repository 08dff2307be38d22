"""Snapdragon target: ExecuTorch .pte (XNNPACK) and lite-interpreter .ptl (qnnpack), each loaded
back in its own runtime on the host and held to the profile's parity thresholds against FP32.

Every model here is trained in the test (digits; torchvision architectures on digits scaled to
3x32x32), so the thresholds are judged, not just measured.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import toolchain
from toolchain.core.errors import ToolchainError
from toolchain.inputs.examples import digits_rgb, train_torchvision

from .conftest import SNAPDRAGON, fast_profile, without_artifacts
from .test_torchvision import assert_report_with_profiles

ARTIFACTS = {
    "pte_int8": ("executorch", ".pte"),
    "pte_fp32": ("executorch", ".pte"),
    "pte_fp16": ("executorch", ".pte"),
    "ptl_int8": ("torchscript-lite", ".ptl"),
}
HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
# the default profile's Hexagon NPU artifact (tests/test_qnn.py)
NPU = {"qnn_int8": ("onnx-epcontext", ".onnx"), "qnn_int4": ("onnx-epcontext", ".onnx")}
# offered to Linear-heavy models (the digits CNN's Linear layers hold 87 % of its weights): tests/test_int4.py
INT4 = {"pte_int4": ("executorch", ".pte")}


def snapdragon_profile(tmp_path, calibration=64, validation=128, extra=""):
    """The target's Arm-CPU artifacts (ExecuTorch, lite interpreter): the NPU's has tests of its own."""
    profile = fast_profile(tmp_path, calibration, validation, extra, base=SNAPDRAGON, batch_sizes=None)
    return str(without_artifacts(profile, tmp_path, "qnn_int8", "qnn_int4"))


@pytest.fixture(scope="module")
def digits_build(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snap")
    return toolchain.build(
        str(digits["model"]), "qualcomm_snapdragon", tmp / "out", digits["calibration"], digits["validation"]
    )


def _judged_and_passed(data, expected=ARTIFACTS):
    failures = {
        a["name"]: (a["parity"]["failures"], a["parity"]["top1_agreement"], a["parity"]["accuracy"])
        for a in data["artifacts"]
    }
    assert data["parity_judged"] is True and data["passed"] is True, (failures, data["reference"]["accuracy"])
    assert {a["name"] for a in data["artifacts"]} == set(expected), data["skipped"]
    for a in data["artifacts"]:
        assert a["parity"]["passed"] is True, a
        assert a["format"] == expected[a["name"]][0] and a["path"].endswith(expected[a["name"]][1])


def test_digits_artifacts_meet_parity_in_their_own_runtimes(digits_build):
    """The default profile as a user runs it: every artifact, the NPU's too where
    onnxruntime-qnn is installed."""
    report, folder = digits_build
    data = json.loads((folder / "report.json").read_text())
    _judged_and_passed(data, {**ARTIFACTS, **INT4, **NPU} if HAS_QNN else {**ARTIFACTS, **INT4})
    if HAS_QNN:
        assert data["skipped"] == []
        npu = next(a for a in data["artifacts"] if a["name"] == "qnn_int8")
        # judged on the profile's 128 of the 512 validation inputs (the emulator runs one at a time);
        # never primary
        assert (
            npu["parity"]["samples"] == 128
            and data["data"]["validation"]["samples"] == 512
            and not npu["primary"]
        )
        assert "qnn_int8: parity on 128 of the 512 validation inputs" in (folder / "report.md").read_text()
        # its latency column is the emulator's
        assert "(host emulation)" in (folder / "report.md").read_text()
    else:
        assert [s["name"] for s in data["skipped"]] == ["qnn_int8", "qnn_int4"]
        assert all("onnxruntime_qnn" in s["reason"] for s in data["skipped"])
    ref_acc = data["reference"]["accuracy"]
    assert ref_acc > 0.95
    by_name = {a["name"]: a for a in data["artifacts"]}
    assert by_name["pte_int8"]["engine"] == "xnnpack" and by_name["ptl_int8"]["engine"] == "qnnpack"
    for a in by_name.values():
        assert ref_acc - a["parity"]["accuracy"] <= 0.01 and a["parity"]["top1_agreement"] >= 0.98, a
        assert a["latency_ms"] > 0
    assert by_name["pte_fp32"]["parity"]["sqnr_db"] > 80  # same FP32 math, another runtime
    # FP16 rounding: real, small
    assert 35 < by_name["pte_fp16"]["parity"]["sqnr_db"] < 80 and by_name["pte_fp16"]["precision"] == "fp16"
    assert by_name["pte_int8"]["size_bytes"] < 0.5 * by_name["pte_fp32"]["size_bytes"]
    assert_report_with_profiles(folder, data)
    pte = json.loads((folder / "profiles" / "pte_int8.json").read_text())
    assert pte["tool"] == "executorch etdump"
    # XNNPACK's INT8 conv
    assert any(o["name"].startswith("Convolution (NHWC, QC8)") for o in pte["operators"]), pte["operators"]
    assert json.loads((folder / "profiles" / "ptl_int8.json").read_text())["tool"] == "torch.profiler"


def test_pte_runs_in_executorch_and_int8_is_delegated_to_xnnpack(digits_build, digits):
    from executorch.runtime import Runtime

    report, folder = digits_build
    int8 = next(a for a in report.artifacts if a.name == "pte_int8")
    assert int8.stage_facts["lower_executorch"] == {"delegate_calls": 1, "outside_delegate": {}}
    method = Runtime.get().load_program(folder / "pte_int8.pte").load_method("forward")
    val = np.load(digits["validation"])
    x, y = val["x"][:64], val["y"][:64]
    out = np.concatenate(
        [method.execute([torch.from_numpy(x[i : i + 1].copy())])[0].numpy() for i in range(len(x))]
    )
    assert (out.argmax(1) == y).mean() > 0.95
    manifest = json.loads((folder / "manifest.json").read_text())
    quant = manifest["artifacts"]["pte_int8"]["stages"][0]
    assert quant["stage"] == "quantize_pt2e" and quant["facts"]["quantize_nodes"] > 0


def test_ptl_is_qnnpack_int8_and_reports_mobile_passes(digits_build):
    from torch.jit.mobile import _export_operator_list, _load_for_lite_interpreter

    report, folder = digits_build
    ptl = next(a for a in report.artifacts if a.name == "ptl_int8")
    passes = ptl.stage_facts["mobile_passes"]
    assert {"freeze", "conv_bn_fusion", "remove_dropout", "fuse_add_relu"} <= set(passes["applied"])
    assert "XNNPACK" in passes["not_applied"]["insert_fold_prepack_ops"]
    assert "insert_fold_prepack_ops" in (folder / "report.md").read_text()
    torch.backends.quantized.engine = "qnnpack"
    ops = _export_operator_list(_load_for_lite_interpreter(str(folder / "ptl_int8.ptl")))
    assert any(op.startswith("quantized::conv2d") for op in ops), ops


def test_parity_is_judged_per_artifact(digits, tmp_path):
    """An SQNR floor between INT8 (~40 dB) and FP32 (>100 dB): INT8 artifacts fail, the FP32 .pte passes,
    and the FP16 .pte is judged by the profile's FP16 thresholds (35 dB), not that floor."""
    # one INT8 artifact (ptl_int8) is enough to fail the floor: pte_int8's lowering is tested above
    profile = without_artifacts(
        Path(snapdragon_profile(tmp_path, 64, 128, "[recovery]\nenabled = false\n")), tmp_path, "pte_int8"
    )
    profile.write_text(profile.read_text().replace("min_sqnr_db = 15.0", "min_sqnr_db = 80.0"))
    report, _ = toolchain.build(
        str(digits["model"]), str(profile), tmp_path / "out", digits["calibration"], digits["validation"]
    )
    verdicts = {a.name: a.parity.passed for a in report.artifacts}
    assert verdicts == {"pte_fp32": True, "pte_fp16": True, "ptl_int8": False}
    # the FP32 fallback is never primary (primary = false); the FP16 .pte passes and is eligible
    assert not report.passed and report.primary.name == "pte_fp16"


def test_qnnpack_relu6_workaround_keeps_parity():
    """qnnpack's quantized clamp scrambles channels-last inputs; without the guard the INT8
    Conv-ReLU6 below has SQNR below 0 dB."""
    from toolchain.core.artifact import Artifact, Kind
    from toolchain.core.context import BuildContext
    from toolchain.core.dataset import Dataset
    from toolchain.stages.fuse import Fuse
    from toolchain.stages.quantize_torch import QuantizeTorch, QuantizeTorchOptions

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU6(), torch.nn.Conv2d(16, 4, 1)
    ).eval()
    x = torch.randn(32, 3, 16, 16)
    ctx = BuildContext(None, Dataset(x.numpy(), None, "test"), (1, 3, 16, 16), True, 2)
    fused, _ = Fuse().run(Artifact(Kind.EAGER, "fp32", model=model), ctx)
    quantized, record = QuantizeTorch(QuantizeTorchOptions(engine="qnnpack", reduce_range=False)).run(
        fused, ctx
    )
    assert record.facts["contiguous_before_clamp"] == 1
    ref, out = model(x), quantized.model(x)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())
    assert sqnr > 25, sqnr


def _export(model, example):
    return torch.export.export(
        model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},)
    )


class _Erfinv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.head = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.head(torch.erfinv(torch.tanh(self.conv(x)) * 0.9).flatten(1))


def test_operator_executorch_cannot_lower_is_named(digits_arrays, tmp_path):
    x = digits_arrays[0][:64]
    torch.export.save(_export(_Erfinv().eval(), torch.from_numpy(x[:2])), tmp_path / "erfinv.pt2")
    np.save(tmp_path / "cal.npy", x)
    report, folder = toolchain.build(
        str(tmp_path / "erfinv.pt2"),
        # pte_fp32 / pte_fp16 stop at the same lowering as pte_int8
        str(without_artifacts(Path(snapdragon_profile(tmp_path, 32, 16)), tmp_path, "pte_fp32", "pte_fp16")),
        tmp_path / "out",
        tmp_path / "cal.npy",
    )
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {"pte_int8"}
    for reason in skipped.values():
        assert "cannot lower operator aten.erfinv.default" in reason, reason
    # qnnpack runs erfinv in float between dequantize/quantize
    assert [a.name for a in report.artifacts] == ["ptl_int8"]
    assert "aten.erfinv" in (folder / "report.md").read_text()


def test_operator_qnnpack_cannot_run_is_named(tmp_path):
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3)
    )
    x = torch.randn(16, 1, 6, 6, 6)
    model(x)
    torch.export.save(_export(model.eval(), x[:2]), tmp_path / "conv3d.pt2")
    np.save(tmp_path / "cal.npy", x.numpy())
    with pytest.raises(ToolchainError) as e:
        toolchain.build(
            str(tmp_path / "conv3d.pt2"),
            snapdragon_profile(tmp_path, 16, 16),
            tmp_path / "out",
            tmp_path / "cal.npy",
        )
    message = str(e.value)
    assert message.startswith("no artifact of target `qualcomm_snapdragon` could be built")
    # Conv3d fused with its ReLU
    assert "ptl_int8: quantize_torch: qnnpack cannot run operator ConvReLU3d" in message
    assert (
        "pte_int8: lower_executorch: ExecuTorch cannot lower operator "
        "quantized_decomposed::dequantize_per_channel" in message
    )
    assert (
        "cannot run operator aten::convolution.out on this model: Expect input tensor to be 3-D or 4-D"
        in message
    )
    assert not (tmp_path / "out").exists()


# `make test`: mobilenet_v3_small (depthwise, HardSwish)
TORCHVISION = ["mobilenet_v2", "mobilenet_v3_small", "resnet18", "shufflenet_v2_x1_0"]


@pytest.fixture(scope="module")
def digits32(digits_arrays, tmp_path_factory):
    x_train, x_test, y_train, y_test = digits_arrays
    folder = tmp_path_factory.mktemp("d32")
    xtr, xte = digits_rgb(x_train), digits_rgb(x_test)
    np.savez(folder / "cal.npz", x=xtr[:128])
    np.savez(folder / "val.npz", x=xte, y=y_test)  # all 594 held-out digits: one flip is 0.17 %
    return folder, xtr, y_train


# all slow (`make test-full`, nightly): 60-140 s each, mostly ExecuTorch lowering; the fast suite's
# Snapdragon builds of trained models are the digits CNN, the transformer and the LSTM
@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_trained_torchvision_architecture_meets_parity(name, digits32, tmp_path):
    folder, x, y = digits32
    # 4 epochs leave MobileNetV2 at ~93 %, near ties
    model = train_torchvision(name, x, y, epochs=8 if name == "mobilenet_v2" else 4)
    torch.export.save(_export(model, torch.from_numpy(x[:2])), tmp_path / f"{name}.pt2")
    report, out = toolchain.build(
        str(tmp_path / f"{name}.pt2"),
        snapdragon_profile(tmp_path, 128, 594),
        tmp_path / "out",
        folder / "cal.npz",
        folder / "val.npz",
    )
    data = report.to_json()
    assert data["reference"]["accuracy"] > 0.85, "the architecture must have learnt the task"
    _judged_and_passed(data)
    assert_report_with_profiles(out, data)
    sizes = {a["name"]: a["size_bytes"] for a in data["artifacts"]}
    assert sizes["pte_int8"] <= 0.3 * sizes["pte_fp32"], sizes
