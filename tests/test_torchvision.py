"""Every torchvision model the x86 target promises builds, and its INT8 artifacts track FP32.

Weights are random (no downloads here; seeded, so every run builds the same network), so
parity is measured but not judged: how much INT8 error a random network accumulates is a
property of that network, not of the code. What the code controls is that the artifact is
that network quantized and run faithfully, which the floor below checks: a broken artifact
(zeros, scrambled channels, the wrong model) has SQNR at or below 0 dB; a faithful INT8 copy
of these random networks is 8 to 17 dB here.
"""

import json

import numpy as np
import pytest

import toolchain

from .conftest import XAVIER, fast_profile

NOT_BROKEN_DB = 3.0  # error power below half the signal's: not garbage (see the module's docstring)
MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "regnet_x_400mf",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tv")
    rng = np.random.default_rng(0)
    np.savez(folder / "cal.npz", x=rng.standard_normal((16, 3, 224, 224), dtype=np.float32))
    np.savez(folder / "val.npz", x=rng.standard_normal((8, 3, 224, 224), dtype=np.float32))
    return folder


def _fast_first(names, fast):
    """`make test` builds the ``fast`` ones; `make test-full` (pytest -m slow too) builds them all."""
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


# all slow (`make test-full`): the fast suite's x86 builds of complex graphs are the trained
# transformer and LSTM (tests/test_transformer.py, tests/test_sequence.py)
@pytest.mark.parametrize("name", _fast_first(MODELS, set()))
def test_torchvision_model_builds_for_x86(name, images, tmp_path):
    report, folder = toolchain.build(
        f"torchvision:{name}",
        str(fast_profile(tmp_path, 16, 8)),
        tmp_path / "out",
        images / "cal.npz",
        images / "val.npz",
    )
    data = report.to_json()
    assert data["passed"] is None and data["verdict"] == "NOT JUDGED (random weights)"
    assert data["parity_judged"] is False and data["parity_thresholds"] is None
    assert "random" in data["model"]["weights"]
    assert data["skipped"] == []
    int8 = {a["name"]: a for a in data["artifacts"] if a["precision"] == "int8"}
    assert set(int8) == {"torch_int8", "onnx_int8"}
    for a in int8.values():
        assert a["parity"]["passed"] is None
        assert a["parity"]["sqnr_db"] > NOT_BROKEN_DB, a
        assert a["size_bytes"] < 0.35 * data["reference"]["size_bytes"], a
        assert (folder / a["path"]).is_file()
    assert_report_with_profiles(folder, data)


@pytest.mark.parametrize(
    "name", _fast_first(["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"], set())
)  # all slow, as above
def test_torchvision_model_builds_for_xavier(name, images, tmp_path):
    import onnx
    from onnx import numpy_helper

    report, folder = toolchain.build(
        f"torchvision:{name}",
        str(fast_profile(tmp_path, 16, 8, base=XAVIER)),
        tmp_path / "out",
        images / "cal.npz",
        images / "val.npz",
    )
    data = report.to_json()
    assert (
        data["passed"] is None and data["skipped"] == [] and data["engine"]["status"] == "pending on device"
    )
    qdq = next(a for a in data["artifacts"] if a["name"] == "onnx_int8_qdq")
    assert qdq["parity"]["sqnr_db"] > NOT_BROKEN_DB, qdq
    model = onnx.load(str(folder / qdq["path"]))
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [
        consts[n.input[2]] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    ]
    assert zero_points and not any(np.any(z) for z in zero_points)
    assert_report_with_profiles(folder, data)


def assert_report_with_profiles(folder, data):
    """Every build folder, of every target, has report.html and a profile per runnable model (all but
    the host HTP emulation's: one EPContext node, nothing to break down)."""
    from toolchain import runtimes

    assert (folder / "report.html").read_text().startswith("<!doctype html>")
    for entry in [data["reference"], *data["artifacts"]]:
        if "runtime" in entry and runtimes.get(entry["runtime"]).profile is None:
            assert entry["profile"] is None, entry["name"]
            continue
        profile = json.loads((folder / entry["profile"]).read_text())
        assert profile["operators"] and profile["total_ms"] > 0, entry["profile"]
