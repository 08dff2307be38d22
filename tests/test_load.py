"""Model inputs: what loads, and what is refused with one clear message."""

import pytest
import torch

from toolchain.core.artifact import Kind
from toolchain.core.errors import ModelLoadError
from toolchain.inputs.load import load_model, parse_shape


def _net():
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()


def test_exported_program_gives_shape_and_dynamic_batch(digits):
    loaded = load_model(str(digits["model"]))
    assert loaded.artifact.kind is Kind.EXPORTED
    assert loaded.input_shape == (1, 1, 8, 8)
    assert loaded.dynamic_batch is True


def test_torchscript(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(_net()), str(path))
    loaded = load_model(str(path))
    assert loaded.artifact.kind is Kind.TORCHSCRIPT and loaded.input_shape is None


def test_pickled_module_needs_trust(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(_net(), str(path))
    with pytest.raises(ModelLoadError, match="pickled Python object; loading it runs code.*--trust-pickle"):
        load_model(str(path))
    assert load_model(str(path), trust_pickle=True).artifact.kind is Kind.EAGER


def test_state_dict_alone_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(_net().state_dict(), str(path))
    with pytest.raises(ModelLoadError, match="holds only tensors"):
        load_model(str(path))


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_corrupt_files(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(b"\x00not a model" * 50)
    with pytest.raises(ModelLoadError, match="garbage"):
        load_model(str(path))


def test_truncated_torchscript(tmp_path):
    good = tmp_path / "good.pt"
    torch.jit.save(torch.jit.script(_net()), str(good))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cut.pt"):
        load_model(str(cut))


def test_truncated_exported_program(digits, tmp_path):
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(digits["model"].read_bytes()[:4000])
    with pytest.raises(ModelLoadError, match="not a readable torch.export archive"):
        load_model(str(cut))


def test_a_program_torch_cannot_make_a_module_of_is_refused_with_the_reason(tmp_path):
    class Tagged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.meta = torch.nn.Linear(4, 4)  # torch.fx.GraphModule.meta is a dict of its own

        def forward(self, x):
            return self.meta(x)

    path = tmp_path / "tagged.pt2"
    torch.export.save(torch.export.export(Tagged(), (torch.rand(2, 4),)), str(path))
    with pytest.raises(
        ModelLoadError, match="a submodule named `meta` collides with torch.fx.GraphModule's own attribute"
    ):
        load_model(str(path))


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope.pt"))
    other = tmp_path / "model.h5"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unknown kind"):
        load_model(str(other))


def test_torchvision_names():
    loaded = load_model("torchvision:squeezenet1_1")
    assert loaded.weights.startswith("random") and loaded.input_shape == (1, 3, 224, 224)
    with pytest.raises(
        ModelLoadError, match="torchvision has no classification model `resnet19`; similar: .*resnet18"
    ):
        load_model("torchvision:resnet19")


def test_parse_shape():
    assert parse_shape("1x3x224x224") == (1, 3, 224, 224)
    for bad in ("1,3,224", "ax3", "1x0x2"):
        with pytest.raises(ModelLoadError):
            parse_shape(bad)
