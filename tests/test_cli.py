"""User errors: one line, exit 2, before anything slow runs, and no build folder left behind."""

import importlib.util
import json

import pytest

import toolchain
from toolchain.core.errors import EXIT_USER_ERROR, DataError

from .conftest import cli, fast_profile


@pytest.mark.parametrize(
    "shape, message",
    [
        (
            "3x224x224",
            "--input-shape 3x224x224 has 3 dimensions, but the model has 4 (1x3x224x224): "
            "give the batch dimension first, e.g. 1x3x224x224",
        ),
        # the model's own refusal: in-process in test_build_x86's test_wrong_input_shape_leaves_no_folder
        pytest.param("1x1x28x28", "the model rejects an input of shape 1x1x28x28", marks=pytest.mark.slow),
    ],
)
def test_wrong_input_shape_is_one_line(shape, message, tmp_path):
    r = cli(
        "-q", "build", "torchvision:squeezenet1_1", "--input-shape", shape, "--out", str(tmp_path / "out")
    )
    assert r.returncode == EXIT_USER_ERROR, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_data_path_is_reported_before_the_model_loads(monkeypatch, tmp_path):
    import importlib

    build_module = importlib.import_module("toolchain.build")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data paths were checked")

    monkeypatch.setattr(build_module, "load_model", no_loading)
    with pytest.raises(DataError, match="validation data `.*nowhere.npz` does not exist"):
        toolchain.build("torchvision:resnet50", "x86_fbgemm", tmp_path / "out", val=tmp_path / "nowhere.npz")


@pytest.mark.parametrize("value", ["0=logits", "classification", "=regression"])
def test_bad_outputs_option(value, tmp_path):
    r = cli("build", "torchvision:squeezenet1_1", "--outputs", value)
    assert r.returncode == EXIT_USER_ERROR and "--outputs" in r.stderr and "KEY=ROLE" in r.stderr, r.stderr


def test_doctor_lists_every_runtime_and_stage_with_versions_or_the_reason():
    r = cli("doctor", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    runtimes = {row["name"]: row for row in data["runtimes"]}
    assert set(runtimes) >= {
        "torchscript",
        "onnxruntime",
        "executorch",
        "lite_interpreter",
        "openvino",
        "tensorrt",
    }
    assert runtimes["onnxruntime"]["available"] and runtimes["onnxruntime"]["libraries"]["onnxruntime"]
    stages = {row["name"]: row for row in data["stages"]}
    assert {"export_onnx", "quantize_onnx", "quantize_pt2e", "lower_executorch"} <= set(stages)
    if importlib.util.find_spec("tensorrt") is None:
        assert (
            runtimes["tensorrt"]["available"] is False
            and "tensorrt is not installed" in runtimes["tensorrt"]["reason"]
        )


def test_an_artifact_whose_library_is_missing_is_skipped_with_the_reason(digits, tmp_path, monkeypatch):
    from toolchain.core import libraries

    real = libraries.library
    monkeypatch.setattr(
        libraries,
        "library",
        lambda name: (
            libraries.Library(name, None, "pip install onnxruntime") if name == "onnxruntime" else real(name)
        ),
    )
    report, _ = toolchain.build(
        str(digits["model"]),
        str(fast_profile(tmp_path)),
        tmp_path / "out",
        digits["calibration"],
        digits["validation"],
    )
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert skipped == {
        "onnx_fp32": (
            "runtime `onnxruntime` is unavailable here: onnxruntime is not installed "
            "(pip install onnxruntime)"
        ),
        "onnx_int8": (
            "stage `quantize_onnx` is unavailable here: onnxruntime is not installed "
            "(pip install onnxruntime)"
        ),
        "onnx_int8_dynamic": (
            "stage `quantize_onnx_dynamic` is unavailable here: onnxruntime is not installed "
            "(pip install onnxruntime)"
        ),
    }
    assert [a.name for a in report.artifacts] == ["torch_int8"]
