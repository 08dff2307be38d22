"""User errors: one line, exit 2, before anything slow runs, and no build folder left behind."""

import pytest

import toolchain
from toolchain.errors import EXIT_USER_ERROR, DataError

from .conftest import cli


@pytest.mark.parametrize("shape, message", [
    ("3x224x224", "--input-shape 3x224x224 has 3 dimensions, but the model has 4 (1x3x224x224): give the batch dimension first, e.g. 1x3x224x224"),
    ("1x1x28x28", "the model rejects an input of shape 1x1x28x28"),
])
def test_wrong_input_shape_is_one_line(shape, message, tmp_path):
    r = cli("-q", "build", "torchvision:squeezenet1_1", "--input-shape", shape, "--out", str(tmp_path / "out"))
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
