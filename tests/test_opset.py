"""Opset-bounded targets (Xavier: TensorRT 8.5 reads opset <= 17) get a model from a torch.export
program whose export writes opset 18: converted down with Split/Pad rewritten to their older
forms, else written at 17 by the TorchScript-based exporter, else refused naming the operator."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import toolchain
from toolchain.passes.opset import ConversionError, convert_opset
from toolchain.stages.quantize_onnx import sort_nodes
from toolchain.tensorrt.operators import parser_gaps

from .conftest import XAVIER, fast_profile
from .models import export, mish_cnn, performer_digits


def _model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _opset(model):
    return next(o.version for o in model.opset_import if o.domain == "")


@pytest.mark.parametrize("length, sizes", [(9, None), (8, [3, 3, 2])])
def test_split_into_num_outputs_becomes_opset_13s_split_computing_the_same(length, sizes):
    """torch.chunk: Split-18's num_outputs, the last part smaller when the axis does not divide."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", length])
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["n", None]) for i in range(3)]
    split = helper.make_node("Split", ["x"], [o.name for o in outs], axis=1, num_outputs=3)
    model = _model([split], [x], outs)
    converted, rewritten = convert_opset(model, 17)
    assert _opset(converted) == 17 and rewritten == {"Split": 1}
    assert [o.domain for o in converted.opset_import] == [""]  # nothing left of the rewrite's bookkeeping
    (node,) = converted.graph.node
    assert node.domain == "" and not [a for a in node.attribute if a.name == "num_outputs"]
    given = {i.name: numpy_helper.to_array(i).tolist() for i in converted.graph.initializer}
    assert (list(given.values()) == [sizes]) if sizes else not given
    data = np.arange(2 * length, dtype=np.float32).reshape(2, length)
    for old, new in zip(_run(model, data), _run(converted, data)):
        np.testing.assert_array_equal(old, new)


def test_pad_without_axes_converts_and_pad_with_axes_or_an_op_without_older_form_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    pads = numpy_helper.from_array(np.array([0, 1, 0, 1], dtype=np.int64), "pads")
    plain = _model([helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")], [x], [y], [pads])
    converted, rewritten = convert_opset(plain, 17)
    assert rewritten == {"Pad": 1}
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(_run(plain, data)[0], _run(converted, data)[0])

    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    two = numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "pads")
    chosen = _model([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"])], [x], [y], [two, axes])
    with pytest.raises(ConversionError, match="Pad `` pads chosen axes"):
        convert_opset(chosen, 17)
    mish = _model([helper.make_node("Mish", ["x"], ["y"])], [x], [y])
    with pytest.raises(ConversionError, match="^No Previous Version of Mish exists$"):
        convert_opset(mish, 17)


def test_nodes_the_quantizer_put_before_what_their_branch_reads_are_sorted(tmp_path):
    """ONNX Runtime's quantizer orders nodes by their own inputs: an If whose branch reads an outer
    value can come before that value's producer (the TorchScript exporter's scatter_reduce)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    branch = lambda op: helper.make_graph(
        [helper.make_node(op, ["a"], ["b"])],
        op,
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("Neg"), else_branch=branch("Abs")),
        helper.make_node("Relu", ["x"], ["a"]),  # read inside the branches, made after them
    ]
    path = tmp_path / "q.onnx"
    onnx.save(_model(nodes, [x], [y], [cond], opset=17), path)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(str(path))
    assert sort_nodes(path, external=False) is True
    onnx.checker.check_model(str(path))
    data = np.array([-1.0, 0.5, 2.0], dtype=np.float32)
    np.testing.assert_array_equal(_run(onnx.load(path), data)[0], -np.maximum(data, 0))
    assert sort_nodes(path, external=False) is False  # sorted: left as it is


@pytest.fixture(scope="module")
def opset18_models(digits_arrays, tmp_path_factory):
    x_train, x_test, y_train, y_test = digits_arrays
    folder = tmp_path_factory.mktemp("opset18")
    export(performer_digits(x_train, y_train), x_train, folder / "performer.pt2")
    export(mish_cnn(x_train, y_train), x_train, folder / "mish.pt2")
    np.savez(folder / "calib.npz", x=x_train[:128])
    np.savez(folder / "val.npz", x=x_test[:256], y=y_test[:256])
    return folder


@pytest.mark.parametrize(
    "model, exporter, route",
    [
        # chunk (Split-18's num_outputs) rewritten; LayerNorm, GELU (as Erf), exp-kernel attention
        ("performer.pt2", "dynamo", "converted from opset 18 (Split x1 rewritten to their older form)"),
        # Mish-18 has no older form: the TorchScript-based exporter writes Softplus/Tanh at 17
        (
            "mish.pt2",
            "torchscript",
            "TorchScript-based exporter at opset 17 (converting from 18: No Previous Version of Mish exists)",
        ),
    ],
)
def test_a_model_exported_at_opset_18_gets_every_xavier_artifact_at_17(
    opset18_models, tmp_path, model, exporter, route
):
    profile = fast_profile(tmp_path, 128, 256, base=XAVIER, batch_sizes=None)
    report, folder = toolchain.build(
        str(opset18_models / model),
        str(profile),
        tmp_path / "out",
        opset18_models / "calib.npz",
        opset18_models / "val.npz",
    )
    data = report.to_json()
    assert {a["name"] for a in data["artifacts"]} == {"onnx_fp32", "onnx_fp16", "onnx_int8_qdq"}, data[
        "skipped"
    ]
    assert data["passed"] is True and data["reference"]["accuracy"] > 0.85
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("onnx_fp32", "onnx_fp16", "onnx_int8_qdq"):
        facts = next(s["facts"] for s in manifest["artifacts"][name]["stages"] if s["stage"] == "export_onnx")
        assert (facts["exporter"], facts["opset_route"], facts["opset"]) == (exporter, route, 17)
        assert facts["exported_opset"] == 18 and facts["dynamic_batch"] is True
        proto = onnx.load(str(folder / f"{name}.onnx"))
        assert _opset(proto) == 17 and parser_gaps(proto, "8.5.2") == {}, name
    fp32 = next(a for a in data["artifacts"] if a["name"] == "onnx_fp32")
    assert fp32["parity"]["sqnr_db"] > 90  # the same function, in other operators


def test_an_operator_no_exporter_can_write_at_17_is_named_in_one_line_per_artifact(tmp_path):
    """F.fold is Col2Im, new in opset 18: neither onnx's converter nor the TorchScript-based
    exporter has it at 17 (weights do not matter: nothing is judged)."""
    model = torch.nn.Sequential(
        torch.nn.Unflatten(1, (4, 16)), torch.nn.Fold((5, 5), (2, 2)), torch.nn.Flatten()
    )
    x = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
    export(model.eval(), x, tmp_path / "fold.pt2")
    np.savez(tmp_path / "calib.npz", x=x)
    profile = fast_profile(tmp_path, 24, 8, base=XAVIER, batch_sizes=None)
    with pytest.raises(toolchain.ToolchainError) as e:
        toolchain.build(str(tmp_path / "fold.pt2"), str(profile), tmp_path / "out", tmp_path / "calib.npz")
    lines = str(e.value).splitlines()
    assert lines[0] == "no artifact of target `nvidia_xavier` could be built:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["onnx_fp32", "onnx_fp16", "onnx_int8_qdq"]
    for line in lines[1:]:
        assert (
            "No Previous Version of Col2Im exists" in line and "'aten::col2im'" in line and len(line) < 300
        ), line
        assert "graph(" not in line and "Torch IR" not in line
    assert not (tmp_path / "out").exists()


def test_a_fallback_export_whose_batch_does_not_hold_fixes_the_batch(tmp_path):
    """A size the program derives from the batch (a ViT's class token, `cls.expand(x.shape[0], ...)`) is
    traced as a constant: the TorchScript-based file refuses any other batch. It is checked at batch 3
    and written with a fixed batch instead, and timed and planned at that batch."""

    class ClassToken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.cls = torch.nn.Linear(8, 4), torch.nn.Parameter(torch.ones(1, 2))

        def forward(self, x):
            return torch.nn.functional.mish(torch.cat([self.cls.expand(x.shape[0], -1), self.fc(x)], 1))

    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    export(ClassToken().eval(), x, tmp_path / "indexed.pt2")
    np.savez(tmp_path / "calib.npz", x=x)
    profile = fast_profile(tmp_path, 24, 8, base=XAVIER, batch_sizes=None)
    report, folder = toolchain.build(
        str(tmp_path / "indexed.pt2"), str(profile), tmp_path / "out", tmp_path / "calib.npz"
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    facts = next(
        s["facts"] for s in manifest["artifacts"]["onnx_fp32"]["stages"] if s["stage"] == "export_onnx"
    )
    assert facts["exporter"] == "torchscript" and facts["dynamic_batch"] is False, facts
    fp32 = next(a for a in report.to_json()["artifacts"] if a["name"] == "onnx_fp32")
    assert fp32["parity"]["sqnr_db"] > 90  # the program's function, one sample at a time
    assert [p["batch_size"] for p in fp32["bench"]["sweep"]] == [1]
    # `toolchain bench` re-times it at its batch too, beside the others' sweeps
    from toolchain.bench import bench_build

    retimed = bench_build(folder, batch_sizes=(1, 8))["results"]
    assert [p["batch_size"] for p in retimed["onnx_fp32"]["sweep"]] == [1]
    plan = json.loads((folder / "engine_plan.json").read_text())["input"]
    assert (plan["min"][0], plan["opt"][0], plan["max"][0], plan["static"]) == (1, 1, 1, True)
