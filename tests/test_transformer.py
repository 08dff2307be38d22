"""A vision transformer (attention, LayerNorm, GELU) trained here, built for every target."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import toolchain
from toolchain.passes.decompose import decompose
from toolchain.tensorrt.operators import parser_gaps

from .conftest import SNAPDRAGON, X86, XAVIER, fast_profile, without_artifacts
from .models import export, tiny_vit, with_outlier_norms


@pytest.fixture(scope="module")
def vit(digits_arrays, tmp_path_factory):
    x_train, x_test, y_train, y_test = digits_arrays
    folder = tmp_path_factory.mktemp("vit")
    model = tiny_vit(x_train, y_train)
    export(model, x_train, folder / "vit.pt2")
    export(with_outlier_norms(model), x_train, folder / "vit_outliers.pt2")
    np.savez(folder / "calib.npz", x=x_train[:128])
    np.savez(folder / "val.npz", x=x_test[:256], y=y_test[:256])
    return folder


def _build(vit, base, tmp_path, model="vit.pt2"):
    profile = fast_profile(tmp_path, calibration=128, validation=256, base=base)
    report, folder = toolchain.build(
        str(vit / model), str(profile), tmp_path / "out", vit / "calib.npz", vit / "val.npz"
    )
    return report.to_json(), folder


def _stage_facts(folder, artifact, stage):
    manifest = json.loads((folder / "manifest.json").read_text())
    return next(s["facts"] for s in manifest["artifacts"][artifact]["stages"] if s["stage"] == stage)


def _ops(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_x86_transformer_in_int8_static_and_dynamic_and_bf16(vit, tmp_path, monkeypatch):
    import torch

    from toolchain.measure import cpu

    # as on an AVX2-only build host: parity holds, latency flagged
    monkeypatch.setattr(cpu, "host_has_bf16", lambda: False)
    amx = tmp_path / "amx.toml"  # a deployment CPU with BF16 (Sapphire Rapids): the BF16 artifact applies
    amx.write_text(X86.read_text().replace('isa = "avx2"', 'isa = "amx"'))
    data, folder = _build(vit, amx, tmp_path)
    artifacts = {a["name"]: a for a in data["artifacts"]}
    assert set(artifacts) == {
        "torch_int8",
        "onnx_fp32",
        "onnx_int8",
        "onnx_int8_dynamic",
        "torch_int8_dynamic",
        "torch_bf16",
    }, data["skipped"]
    assert data["passed"] is True and data["reference"]["accuracy"] > 0.85
    for a in artifacts.values():
        assert a["parity"]["passed"] is True and a["parity"]["top1_agreement"] >= 0.99, (
            a["name"],
            a["parity"],
        )
    # the multi-head attention's reshapes use the batch size: scripted, not traced at batch 1
    assert _stage_facts(folder, "torch_int8", "save_torchscript")["torchscript"] == "scripted"
    assert {p["batch_size"] for p in artifacts["torch_int8"]["bench"]["sweep"]} == {1, 2}
    assert "Gelu" not in _ops(folder / "onnx_fp32.onnx") and "Erf" in _ops(folder / "onnx_fp32.onnx")
    # BF16 is judged by its own, tighter thresholds, and says whether this host's latency means anything
    assert data["parity_thresholds"]["precisions"]["bf16"]["min_sqnr_db"] == 25.0
    assert (
        artifacts["torch_bf16"]["precision"] == "bf16" and artifacts["torch_bf16"]["parity"]["sqnr_db"] > 25
    )
    facts = _stage_facts(folder, "torch_bf16", "cast_torch")
    assert facts["host_has_bf16"] is False and "not representative" in facts["latency_note"]
    assert _stage_facts(folder, "torch_bf16", "save_torchscript")["torchscript"] == "scripted"
    assert "BFloat16" in str(torch.jit.load(str(folder / "torch_bf16.pt")).graph)  # it computes in BF16
    assert (
        _stage_facts(folder, "torch_int8_dynamic", "quantize_torch_dynamic")["quantized_modules"]["Linear"]
        >= 4
    )


def test_xavier_transformer_is_opset_17_that_tensorrt_85_parses_and_its_engine_runs(
    vit, tmp_path, monkeypatch
):
    from toolchain.on_device import engine_build

    from .fake_tensorrt import install

    data, folder = _build(vit, XAVIER, tmp_path)
    assert {a["name"] for a in data["artifacts"]} == {"onnx_fp32", "onnx_fp16", "onnx_int8_qdq"}, data[
        "skipped"
    ]
    assert data["passed"] is True
    fp16 = next(a for a in data["artifacts"] if a["name"] == "onnx_fp16")
    assert fp16["precision"] == "fp16" and fp16["parity"]["sqnr_db"] > 35  # the profile's FP16 bar
    half = onnx.load(str(folder / "onnx_fp16.onnx"))
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # FP32 I/O, FP16 inside
    assert any(i.data_type == TensorProto.FLOAT16 for i in half.graph.initializer)
    for name in ("onnx_fp32", "onnx_int8_qdq"):
        proto = onnx.load(str(folder / f"{name}.onnx"))
        assert next(o.version for o in proto.opset_import if o.domain == "") == 17
        assert parser_gaps(proto, "8.5.2") == {}, name  # no LayerNormalization, no Gelu-20
        assert _stage_facts(folder, name, "decompose_onnx")["decomposed"] == {"LayerNormalization": 5}
    fp32 = next(a for a in data["artifacts"] if a["name"] == "onnx_fp32")
    assert fp32["parity"]["sqnr_db"] > 90  # the expansion is the same function
    install(monkeypatch, "8.5.2.2")
    record = engine_build(folder)
    assert record["verified"] and record["parity"]["passed"] is True, record["parity"]


def test_xavier_refuses_an_onnx_file_tensorrt_85_cannot_parse(vit, tmp_path):
    """Without the decomposition the host's parity would pass, but the device could not build an engine."""
    text = XAVIER.read_text().replace(', "decompose_onnx"]', "]")  # the FP32 and INT8 chains; FP16 keeps it
    base = tmp_path / "no_decompose.toml"
    base.write_text(text)
    data, folder = _build(vit, base, tmp_path)
    skipped = {s["name"]: s["reason"] for s in data["skipped"]}
    for name in ("onnx_fp32", "onnx_int8_qdq"):
        assert re.match(
            r"TensorRT 8\.5\.2's ONNX parser cannot import LayerNormalization \(5 nodes", skipped[name]
        ), skipped
        assert not (folder / f"{name}.onnx").exists()
    assert [a["name"] for a in data["artifacts"]] == ["onnx_fp16"]
    assert data["engine"]["status"] == "not planned"


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("axis", [-1, -2, 1])
def test_decomposed_layer_norm_computes_what_onnx_runtime_computes(opset, axis):
    rng = np.random.default_rng(0)
    shape, norm_rank = [3, 5, 8], (1 if axis == -1 else 2)
    scale = rng.uniform(0.5, 2, shape[-norm_rank:]).astype(np.float32)
    bias = rng.normal(0, 1, shape[-norm_rank:]).astype(np.float32)
    node = helper.make_node(
        "LayerNormalization", ["x", "scale", "bias"], ["y"], axis=axis, epsilon=1e-3, name="ln"
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    x = rng.normal(3, 4, shape).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert decompose(model, ("LayerNormalization",)) == {"LayerNormalization": 1}
    onnx.checker.check_model(model, full_check=True)
    assert "LayerNormalization" not in {n.op_type for n in model.graph.node}
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_parser_gaps_follow_onnx_tensorrts_operator_tables():
    nodes = [
        helper.make_node("LayerNormalization", ["x", "s"], ["a"], name="ln"),
        helper.make_node("Gelu", ["a"], ["b"], name="gelu"),
        helper.make_node("Relu", ["b"], ["c"], name="relu"),
        helper.make_node("FusedGemm", ["c", "w"], ["d"], domain="com.microsoft", name="fused"),
    ]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [], []), opset_imports=[helper.make_opsetid("", 20)]
    )
    above = {"opset 20 (it reads up to 17)": ["the model"]}
    assert parser_gaps(proto, "8.5.2") == {
        **above,
        "LayerNormalization": ["ln"],
        "Gelu": ["gelu"],
        "com.microsoft.FusedGemm": ["fused"],
    }
    # LN from 8.6
    assert parser_gaps(proto, "8.6.1") == {**above, "Gelu": ["gelu"], "com.microsoft.FusedGemm": ["fused"]}
    assert parser_gaps(proto, "10.3.0") == {"com.microsoft.FusedGemm": ["fused"]}


# nightly (23 s): ExecuTorch and the lite interpreter lower a recurrent model (the LSTM) and the digits
# CNN in the suite
@pytest.mark.slow
def test_snapdragon_transformer_passes_in_every_runtime(vit, tmp_path):
    # pte_fp32 / pte_fp16 are the same ExecuTorch lowering as pte_int8 without quantization (10-15 s
    # each here): left out for the suite's time; test_snapdragon builds them for the digits CNN
    data, _ = _build(
        vit, without_artifacts(SNAPDRAGON, tmp_path, "pte_fp32", "pte_fp16", "qnn_int8", "pte_int4"), tmp_path
    )
    artifacts = {a["name"]: a for a in data["artifacts"]}
    assert set(artifacts) == {"pte_int8", "ptl_int8", "ptl_int8_dynamic"}, data["skipped"]
    assert data["passed"] is True
    for a in artifacts.values():
        assert a["parity"]["passed"] is True and a["parity"]["top1_agreement"] >= 0.99, (
            a["name"],
            a["parity"],
        )


# x86's static torch_int8 also needs float layers on top of the migration (its 7-bit activations on an
# AVX2 target), and Xavier / Snapdragon add 20 s / 2 min: nightly (`make test-full`).
@pytest.mark.parametrize(
    "base, names",
    [
        (X86, ("onnx_int8", "onnx_int8_dynamic", "torch_int8_dynamic")),
        pytest.param(X86, ("torch_int8",), marks=pytest.mark.slow),
        pytest.param(XAVIER, ("onnx_int8_qdq",), marks=pytest.mark.slow),
        pytest.param(SNAPDRAGON, ("pte_int8", "ptl_int8", "ptl_int8_dynamic"), marks=pytest.mark.slow),
    ],
    ids=["x86", "x86-torch", "xavier", "snapdragon"],
)
def test_transformer_outlier_channels_are_recovered_by_smoothquant(vit, tmp_path, base, names):
    """LayerNorm outlier channels (function-preserving, 50x) break every INT8 artifact, static and
    dynamic; recovery's SmoothQuant migration moves them into the Linear weights and earns the pass."""
    import tomllib

    listed = tomllib.loads(base.read_text())["artifacts"]
    kept = (*names, "onnx_fp32") if base is XAVIER else names  # TensorRT's FP32 reference
    data, folder = _build(
        vit,
        without_artifacts(base, tmp_path, *(n for n in listed if n not in kept)),
        tmp_path,
        "vit_outliers.pt2",
    )
    artifacts = {a["name"]: a for a in data["artifacts"]}
    assert set(artifacts) == set(kept), data["skipped"]
    assert data["passed"] is True and data["reference"]["accuracy"] > 0.85
    for name in names:
        a, recovery = artifacts[name], artifacts[name]["recovery"]
        # all-INT8 as first built: SQNR 3.5-8 dB here, against a bar of 15
        assert recovery["before"]["sqnr_db"] < 15, (name, recovery["before"])
        assert recovery["status"] == "recovered" and a["parity"]["passed"] is True, recovery["summary"]
        assert (
            "smooth" in recovery["attempts"][-1]["fixes"]
            and "SmoothQuant scale migration" in recovery["summary"]
        )
        # no Conv/Linear pair to equalize in a ViT (GELU between its Linears): that fix is not tried at all
        assert not any("equalize" in t["fixes"] for t in recovery["attempts"]), [
            t["what"] for t in recovery["attempts"]
        ]
        migrated = next(
            t
            for t in recovery["attempts"]
            if t["fixes"] and t["fixes"][-1] == "smooth" and not t["float_layers"]
        )
        # the migration itself did it
        assert migrated["sqnr_db"] > recovery["before"]["sqnr_db"] + 15, (name, migrated)
        stage = next(
            s
            for s in json.loads((folder / "manifest.json").read_text())["artifacts"][name]["stages"]
            if s["stage"].startswith("quantize")
        )
        assert stage["options"]["smooth"] is True  # the shipped file is the migrated one
        facts = stage["facts"]["smoothing"]
        # 4 encoder norms + the final one
        assert facts["groups"] == 5 and facts["fp32_relative_error"] <= 1e-4, facts
