"""The intel_openvino target (issue 29, part 4): OpenVINO IR artifacts whose inference precision is
part of the file, checked as they run on this host's CPU plugin."""

import importlib.util
import json

import pytest

import toolchain

from .conftest import REPO, cli, fast_profile

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed")

OPENVINO = REPO / "targets" / "intel_openvino.toml"


def test_the_openvino_target_builds_ir_artifacts_that_keep_parity(digits, tmp_path):
    import openvino as ov

    profile = fast_profile(tmp_path, 64, 128, base=OPENVINO)
    report, folder = toolchain.build(
        str(digits["model"]), str(profile), tmp_path / "out", digits["calibration"], digits["validation"]
    )
    data = report.to_json()
    by_name = {a["name"]: a for a in data["artifacts"]}
    assert set(by_name) == {"openvino_int8", "openvino_int8_nncf", "openvino_fp32", "openvino_fp16"}, data[
        "skipped"
    ]
    assert report.passed and all(a["parity"]["passed"] for a in by_name.values())
    # the FP32 fallback and the GPU's FP16 IR are never primary (the CPU's latency says nothing of a GPU)
    assert by_name["openvino_int8"]["precision"] == "int8"
    assert data["primary"] in ("openvino_int8", "openvino_int8_nncf")
    assert by_name["openvino_fp32"]["parity"]["sqnr_db"] > 100  # f32 as stated, not the plugin's BF16
    core = ov.Core()
    stated = {}
    for name, a in by_name.items():
        assert a["path"] == f"{name}.xml" and (folder / f"{name}.bin").is_file()
        model = core.read_model(str(folder / a["path"]))
        stated[name] = model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
        # saved at a static batch of 1 (OpenVINO's static kernels are faster), every batch still timed
        assert model.inputs[0].get_partial_shape().to_shape()[0] == 1, (name, model.inputs[0])
        assert len({p["batch_size"] for p in a["bench"]["sweep"]}) > 1, a["bench"]["sweep"]
    assert stated == {
        "openvino_int8": "f32",
        "openvino_int8_nncf": "f32",
        "openvino_fp32": "f32",
        "openvino_fp16": "f16",
    }
    # another batch: the runtime reshapes the IR and compiles it again, with the same outputs
    import numpy as np

    from toolchain.bench import artifact_of
    from toolchain.runtimes import load_runner

    run = load_runner(artifact_of(folder, by_name["openvino_int8_nncf"]), "openvino_ir", 2)
    x = np.load(digits["validation"])["x"][:8].astype(np.float32)
    one_by_one = np.concatenate([run(x[i : i + 1])[0] for i in range(8)])
    np.testing.assert_allclose(run(x)[0], one_by_one, rtol=1e-4, atol=1e-4)
    # FP16 weights for the GPU: half the FP32 file; checked here on the CPU plugin, said so
    assert by_name["openvino_fp16"]["size_bytes"] < 0.6 * by_name["openvino_fp32"]["size_bytes"]
    facts = by_name["openvino_fp16"]["stage_facts"]["convert_openvino_fp16"]
    assert facts["device"] == "GPU" and "a proxy for the GPU" in facts["checked_on"]
    # the manifest's hash covers the weights too: the artifact is both files
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["artifacts"]["openvino_int8"]["sha256"] == by_name["openvino_int8"]["sha256"]


def test_doctor_lists_the_devices_openvino_sees():
    r = cli("doctor", "--json")
    assert r.returncode == 0 and "CPU" in json.loads(r.stdout)["openvino_devices"], r.stderr


def test_x86_offers_openvino_ir_beside_onnx_runtime_with_bf16_for_a_bf16_cpu(digits, tmp_path):
    """Issue 29, part 1: the x86 profile's OpenVINO artifacts. For a deployment CPU with AVX512-BF16
    (`runtime.isa`), a BF16 IR judged at BF16's thresholds; INT8 from the same calibrated Q/DQ model
    as onnx_int8, its INT8 share counted on that model; an FP32 IR that says f32 (never primary)."""
    import openvino as ov

    from .conftest import without_artifacts

    profile = fast_profile(tmp_path, 64, 128, openvino=True)
    profile.write_text(profile.read_text().replace('isa = "avx2"', 'isa = "avx512_bf16"'))
    # the torch artifacts are not this test's subject
    profile = without_artifacts(
        profile, tmp_path, "torch_int8", "torch_bf16", "torch_int8_dynamic", "onnx_int8_dynamic"
    )
    report, folder = toolchain.build(
        str(digits["model"]), str(profile), tmp_path / "out", digits["calibration"], digits["validation"]
    )
    data = report.to_json()
    by_name = {a["name"]: a for a in data["artifacts"]}
    assert set(by_name) == {
        "onnx_fp32",
        "onnx_int8",
        "openvino_int8",
        "openvino_int8_nncf",
        "openvino_fp32",
        "openvino_bf16",
    }, (data["skipped"], data["not_applicable"])
    assert report.passed and all(a["parity"]["passed"] for a in by_name.values())
    core = ov.Core()
    stated = {
        name: core.read_model(str(folder / a["path"]))
        .get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"])
        .astype(str)
        for name, a in by_name.items()
        if name.startswith("openvino")
    }
    assert stated == {
        "openvino_int8": "f32",
        "openvino_int8_nncf": "f32",
        "openvino_fp32": "f32",
        "openvino_bf16": "bf16",
    }
    # NNCF for a VNNI CPU: 8-bit weights (NNCF's overflow fix off), read from the IR's int8 constants
    nncf = by_name["openvino_int8_nncf"]["stage_facts"]["quantize_nncf"]
    assert nncf["overflow_fix"] == "off (8-bit weights)" and nncf["quantizer"].startswith("nncf ")
    assert nncf["float_parts"] == "f32"  # what NNCF leaves unquantized computes as the IR states
    assert largest_int8_weight(folder / "openvino_int8_nncf.xml") > 64
    bf16 = by_name["openvino_bf16"]
    assert bf16["precision"] == "bf16" and bf16["eligible"] is True
    thresholds = data["parity_thresholds"]["precisions"]["bf16"]
    assert bf16["parity"]["sqnr_db"] >= thresholds["min_sqnr_db"]
    # FP32 as stated: far closer than BF16 (which this host computes only where it has AVX512-BF16)
    fp32 = by_name["openvino_fp32"]
    assert fp32["parity"]["sqnr_db"] > 100 and fp32["eligible"] is False
    assert by_name["openvino_int8"]["precision"] in ("int8", "mixed")
    assert by_name["openvino_int8"]["int8_share"] > 0 and by_name["openvino_int8"]["eligible"] is True
    assert data["primary"] in {n for n, a in by_name.items() if a["eligible"]}


def test_nncf_int8_is_judged_and_recovered_with_its_ignored_scope(digits, tmp_path):
    """The NNCF artifact is judged like every other: on the digits CNN with weight outliers
    (tests.models.dead_channel_outliers) NNCF's per-channel 7-bit weights (`isa = "avx2"`: its overflow
    fix) round each outlier row's real weights away and it misses parity; recovery keeps the Linear
    layer that holds them in float (NNCF's ignored scope) and it passes, all other layers INT8."""
    import numpy as np
    import torch

    from .conftest import without_artifacts
    from .models import dead_channel_outliers, export

    model = dead_channel_outliers(torch.export.load(str(digits["model"])).module())
    export(model, np.load(digits["calibration"])["x"], tmp_path / "outliers.pt2")
    profile = fast_profile(tmp_path, 64, 256, base=OPENVINO)
    profile = without_artifacts(profile, tmp_path, "openvino_int8", "openvino_fp16")
    report, folder = toolchain.build(
        str(tmp_path / "outliers.pt2"),
        str(profile),
        tmp_path / "out",
        digits["calibration"],
        digits["validation"],
    )
    data = report.to_json()
    nncf = next(a for a in data["artifacts"] if a["name"] == "openvino_int8_nncf")
    assert nncf["parity"]["passed"], nncf["parity"]
    attempts = nncf["recovery"]["attempts"]
    assert attempts[0]["passed"] is False and nncf["recovery"]["status"] == "recovered"
    facts = nncf["stage_facts"]["quantize_nncf"]
    assert facts["overflow_fix"] == "7-bit weights (no VNNI)"
    assert largest_int8_weight(folder / "openvino_int8_nncf.xml") <= 64  # what the IR holds, not the label
    assert len(nncf["float_layers"]) == 1 and facts["int8_layers"] == facts["weighted_layers"] - 1
    # the float Linear (512 x 64 of the model's ~0.9 M multiply-accumulates): counted, not guessed
    assert nncf["precision"] == "mixed" and 0.5 < nncf["int8_share"] < 1


def largest_int8_weight(xml) -> int:
    """The largest magnitude among an OpenVINO IR's int8 constants (NNCF's compressed weights)."""
    import numpy as np
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    values = [
        int(np.abs(op.get_data().astype(np.int16)).max())
        for op in model.get_ops()
        if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "i8"
    ]
    assert values, "no int8 weights in the IR"
    return max(values)


def test_the_ir_batch_is_fixed_where_asked_and_left_dynamic_at_zero(tmp_path):
    import onnx
    import openvino as ov
    from onnx import TensorProto, helper

    from toolchain.stages.convert_openvino import _fix_batch

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    fixed, dynamic = ov.convert_model(str(path)), ov.convert_model(str(path))
    assert _fix_batch(fixed, 4)["input_shapes"] == {"x": "[4,3]"}
    assert _fix_batch(dynamic, 0)["input_shapes"] == {"x": "[?,3]"}
