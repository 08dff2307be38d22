"""Scripted TorchScript models with the traits published ones have: state kept between calls, control
flow on Python ints, integer and bitwise operators."""

import io
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import toolchain
from toolchain.core.runner import torch_runner
from toolchain.core.state import SavedState, assigned_attributes
from toolchain.passes.symbolics import integer_symbolics

from .conftest import fast_profile
from .models import audio_frames, streaming_voice_activity


@pytest.fixture(scope="module")
def streaming(tmp_path_factory):
    x, y = audio_frames(2048, 0)
    vx, vy = audio_frames(512, 1)
    folder = tmp_path_factory.mktemp("streaming")
    torch.jit.script(streaming_voice_activity(x, y)).save(str(folder / "vad.pt"))
    np.savez(folder / "cal.npz", x=x[:256])
    np.savez(folder / "val.npz", x=vx, y=vy)
    return folder


def test_a_stateful_scripted_detector_gets_torchscript_and_onnx_artifacts_on_x86(streaming, tmp_path):
    """The published-VAD look-alike: its ONNX export needs `not` on an int, and its state would make
    every verdict depend on which calls ran before. Each run starts from the saved state, so the
    frozen TorchScript artifact agrees with FP32 exactly and ships the state machinery as saved."""
    report, out = toolchain.build(
        str(streaming / "vad.pt"),
        str(fast_profile(tmp_path, 128, 256)),
        tmp_path / "out",
        streaming / "cal.npz",
        streaming / "val.npz",
        constants="sr=16000",
    )
    data = report.to_json()
    by_name = {a["name"]: a for a in data["artifacts"]}
    passed = {n for n, a in by_name.items() if a["parity"]["passed"]}
    assert {"torchscript_fp32", "onnx_fp32", "onnx_int8"} <= passed, data["skipped"]
    assert math.isinf(next(a for a in report.artifacts if a.name == "torchscript_fp32").parity.sqnr_db)
    assert by_name["onnx_fp32"]["parity"]["sqnr_db"] > 60
    assert by_name["onnx_fp32"]["stage_facts"]["export_onnx"]["exporter"] == "torchscript"
    (said,) = [w for w in data["warnings"] if "keeps state between calls" in w]
    assert all(name in said for name in ("_state", "_context", "_last_sr", "_last_batch_size"))

    log = (out / "build.log").read_text()  # the build's debug lines, kept with what it built
    assert "DEBUG   stage optimize_torchscript done in" in log  # what the terminal never shows

    shipped = torch.jit.load(str(out / "torchscript_fp32.pt"))
    assert "model._state" in assigned_attributes(shipped)  # it still streams
    assert shipped.model._last_batch_size == 0  # saved as the model was loaded, not as the build left it
    original = torch.jit.load(str(streaming / "vad.pt"))
    chunks = torch.from_numpy(audio_frames(6, 2)[0]).reshape(3, 2, 512)
    with torch.no_grad():
        for chunk in chunks:  # a stream of three chunks: state carried alike in both
            torch.testing.assert_close(shipped(chunk), original(chunk, 16000), rtol=1e-5, atol=1e-6)


class Accumulates(nn.Module):
    def __init__(self):
        super().__init__()
        self.total = torch.zeros(1)
        self.calls = 0

    def forward(self, x):
        self.total = self.total + x.sum()
        self.calls += 1
        return x + self.total


def test_every_run_of_a_stateful_model_starts_from_its_saved_state():
    model = torch.jit.script(Accumulates())
    state = SavedState.of(model)
    assert state.names == ("total", "calls")
    x = np.ones((2, 3), np.float32)
    free = torch_runner(model)
    assert not np.array_equal(free(x)[0], free(x)[0])  # the model's own behaviour: each call adds up
    model.total, model.calls = torch.zeros(1), 0
    run = torch_runner(model, state=state)
    first = run(x)[0]
    np.testing.assert_array_equal(run(x)[0], first)
    np.testing.assert_array_equal(first, x + 6)
    assert model.calls == 0 and float(model.total) == 0  # left as saved, for what copies it next
    assert SavedState.of(torch.jit.script(nn.Linear(2, 2))) is None


class Flagged(nn.Module):
    """`not` on an int attribute, and bitwise operators on an integer input."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def forward(self, x, flags):
        if not self.seen:
            x = x * 2
        return x + ((~flags & 6) ^ 1).to(x.dtype)


def _exported(model, args, opset):
    f = io.BytesIO()
    with integer_symbolics(opset):
        torch.onnx.export(model, args, f, dynamo=False, opset_version=opset, input_names=["x", "flags"])
    return f.getvalue()


def test_integer_and_bitwise_operators_export_where_onnx_has_them():
    model = torch.jit.script(Flagged())
    x, flags = torch.randn(4, 3), torch.arange(12).reshape(4, 3)
    written = _exported(model, (x, flags), 18)
    ops = {n.op_type for n in onnx.load_from_string(written).graph.node}
    assert {"BitwiseNot", "BitwiseAnd", "BitwiseXor"} <= ops  # (`not` on an int: the detector above)
    got = ort.InferenceSession(written).run(None, {"x": x.numpy(), "flags": flags.numpy()})[0]
    np.testing.assert_allclose(got, model(x, flags).numpy(), rtol=1e-6)
    with pytest.raises(Exception, match="bitwise and on integers needs opset 18"):
        _exported(model, (x, flags), 17)
    # the registrations last for the export only: the exporter's own refusal is back after it
    with pytest.raises(Exception, match="bitwise Not for non-boolean"):
        f = io.BytesIO()
        torch.onnx.export(model, (x, flags), f, dynamo=False, opset_version=18)


def test_bitwise_not_below_opset_18_is_its_twos_complement():
    class Inverts(nn.Module):
        def forward(self, flags):
            return ~flags

    flags = torch.tensor([[0, 1, -5, 7]])
    f = io.BytesIO()
    with integer_symbolics(17):
        torch.onnx.export(
            torch.jit.script(Inverts()), (flags,), f, dynamo=False, opset_version=17, input_names=["flags"]
        )
    got = ort.InferenceSession(f.getvalue()).run(None, {"flags": flags.numpy()})[0]
    np.testing.assert_array_equal(got, (~flags).numpy())
