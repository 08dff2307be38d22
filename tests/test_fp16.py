"""FP16 artifacts that overflow: the layers FP16 cannot hold are found from FP32's values, kept in
FP32, and the artifact re-checked (issue 27, part 3)."""

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import toolchain
from toolchain.passes.fp16_range import (
    FP16_MAX,
    drop_cast_round_trips,
    fx_keep_float32,
    fx_overflowing,
    fx_ranges,
)
from toolchain.stages.cast_torch import _cast_graph

from .conftest import SNAPDRAGON, XAVIER, fast_profile, without_artifacts
from .models import export, overflowing_performer


@pytest.fixture(scope="module")
def overflowing(digits_arrays, tmp_path_factory):
    x_train, x_test, y_train, y_test = digits_arrays
    folder = tmp_path_factory.mktemp("fp16")
    export(overflowing_performer(x_train, y_train), x_train, folder / "performer.pt2")
    np.savez(folder / "calib.npz", x=x_train[:128])
    np.savez(folder / "val.npz", x=x_test[:256], y=y_test[:256])
    return folder


def test_snapdragons_fp16_pte_overflows_and_recovery_keeps_the_overflowing_nodes_in_fp32(
    overflowing, tmp_path
):
    only = without_artifacts(
        SNAPDRAGON, tmp_path, "pte_int8", "pte_fp32", "ptl_int8", "ptl_int8_dynamic", "qnn_int8"
    )
    profile = fast_profile(tmp_path, 64, 128, base=only)
    report, folder = toolchain.build(
        str(overflowing / "performer.pt2"),
        str(profile),
        tmp_path / "out",
        overflowing / "calib.npz",
        overflowing / "val.npz",
    )
    (fp16,) = report.to_json()["artifacts"]
    recovery = fp16["recovery"]
    # all-FP16 first: the normaliser is inf, every output NaN
    assert "NaN or infinite" in recovery["before"]["failures"][0]
    assert recovery["status"] == "recovered" and recovery["attempts"][0]["fixes"] == ["keep_overflow"]
    assert fp16["parity"]["passed"] is True and fp16["parity"]["sqnr_db"] > 35, fp16["parity"]
    assert fp16["precision"] == "fp16" and 0.5 < fp16["fp16_share"] < 1  # the attention's matmuls in FP32
    kept = fp16["stage_facts"]["cast_torch"]["fp32_nodes"]
    assert "sum_1" in kept and "div" in kept, kept  # the sum over tokens, and what divides by it
    assert "exp" not in kept and "qkv_lifted" not in kept  # below 65504: FP16 holds them
    assert "fp16 (" in (folder / "report.md").read_text()
    assert report.passed


@pytest.fixture(scope="module")
def xavier_build(overflowing, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("xavier")
    profile = fast_profile(tmp, 64, 128, base=XAVIER)
    return toolchain.build(
        str(overflowing / "performer.pt2"),
        str(profile),
        tmp / "out",
        overflowing / "calib.npz",
        overflowing / "val.npz",
    )


def test_xaviers_fp16_onnx_keeps_what_fp16_cannot_hold_and_the_engine_plan_constrains_it(xavier_build):
    """ONNX Runtime's CPU computes most FP16 nodes in FP32, so the host check cannot see TensorRT's
    overflow: the Xavier profile keeps out-of-range nodes in FP32 from the start, and the engine plan
    gives the same nodes FP32 constraints."""
    report, folder = xavier_build
    fp16 = next(a for a in report.to_json()["artifacts"] if a["name"] == "onnx_fp16")
    kept = fp16["stage_facts"]["float16_onnx"]["fp32_nodes"]
    assert "node_sum_1" in kept and fp16["parity"]["passed"] is True and 0.5 < fp16["fp16_share"] < 1
    model = onnx.load(str(folder / "onnx_fp16.onnx"))
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in onnx.shape_inference.infer_shapes(model).graph.value_info
    }
    total = next(n for n in model.graph.node if n.name == "node_sum_1")
    assert types[total.output[0]] == TensorProto.FLOAT  # no FP16 round trip between kept nodes
    plan = json.loads((folder / "engine_plan.json").read_text())
    # in the Q/DQ model the engine is built from, the matmuls run INT8 (fed by DequantizeLinear, their
    # range is the scale's): the plan holds the rest in FP32, by the names the engine's layers carry
    qdq = onnx.load(str(folder / "onnx_int8_qdq.onnx")).graph
    made_by = {o: n.op_type for n in qdq.node for o in n.output}
    int8 = {n.name for n in qdq.node if any(made_by.get(i) == "DequantizeLinear" for i in n.input)}
    planned = plan["fp32_layers"]["nodes"]
    assert planned == [n for n in kept if n not in int8] and "node_sum_1" in planned and "node_div" in planned
    assert "--precisionConstraints=obey" in plan["trtexec"] and "node_sum_1:fp32" in plan["trtexec"]


def test_the_engine_builder_obeys_the_plans_fp32_layers(xavier_build, tmp_path, monkeypatch):
    import shutil

    from toolchain.on_device import engine_build

    from .fake_tensorrt import install

    folder = tmp_path / "b"
    shutil.copytree(xavier_build[1], folder)  # the engine is written into the folder: a copy of it
    install(monkeypatch)
    engine_build(folder)
    blob = (folder / "model.engine").read_bytes()
    header = json.loads(blob[4 : 4 + int.from_bytes(blob[:4], "little")])
    planned = json.loads((folder / "engine_plan.json").read_text())["fp32_layers"]["nodes"]
    assert planned and sorted(header["fp32_layers"]) == sorted(planned)


class _Normalised(torch.nn.Module):
    def forward(self, x):
        e = torch.exp(x * 11)  # up to e^11 = 59874: within FP16
        return e / e.sum(-1, keepdim=True)  # the sum of 8 is not


def test_fp32_ranges_name_the_nodes_and_keeping_them_makes_fp16_finite():
    x = torch.linspace(-1, 1, 16).reshape(2, 8)
    gm = torch.fx.symbolic_trace(_Normalised())
    largest, _ = fx_ranges(gm, [(x,)])
    assert largest["exp"] < FP16_MAX < largest["sum_1"]
    keep = fx_overflowing(gm, largest)
    assert keep == ["sum_1", "truediv"]  # the sum, and the division reading it
    want = _Normalised()(x)
    half = _cast_graph(torch.fx.symbolic_trace(_Normalised()).to(torch.float16), torch.float16)
    assert half(x)[1].sum() == 0  # x / inf: the second row's probabilities are all 0
    mixed = fx_keep_float32(
        _cast_graph(torch.fx.symbolic_trace(_Normalised()).to(torch.float16), torch.float16),
        torch.float16,
        keep,
    )
    torch.testing.assert_close(mixed(x), want, rtol=2e-3, atol=1e-4)


def test_a_round_trip_through_fp16_between_two_fp32_nodes_is_dropped():
    """x -> ReduceSum (kept FP32) -> Cast fp16 -> Cast fp32 -> Div (kept FP32): the Div reads the sum."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=1),
        helper.make_node("Cast", ["s"], ["s16"], name="s_cast_to_fp16", to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["s16"], ["s32"], name="s_cast_to_fp32", to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "s32"], ["y"], name="div"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    assert drop_cast_round_trips(model, before={"sum", "div"}) == 1
    assert [n.name for n in model.graph.node] == ["sum", "div"]
    big = np.full((1, 8), 4e4, np.float32)  # a sum of 3.2e5: inf in FP16
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": big})[0]
    assert np.all(np.isfinite(got)) and math.isclose(float(got[0, 0]), 0.125, rel_tol=1e-6)


def test_a_round_trip_into_a_graph_output_keeps_the_outputs_name():
    """The last node kept in FP32 feeds the graph's output through the converter's Casts: the output's
    own Cast stays (else the graph names an output no node makes)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=1),
        helper.make_node("Cast", ["s"], ["s16"], name="s_cast_to_fp16", to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["s16"], ["y"], name="graph_output_cast0", to=TensorProto.FLOAT),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    assert drop_cast_round_trips(model, before={"sum"}) == 0
    onnx.checker.check_model(model)
