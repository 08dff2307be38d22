"""Cross-layer equalization computes the same function in FP32 and gives each pair of layers the
same per-channel range, on ONNX graphs and on fused FX modules; a rescale that does not commute
with what sits between two layers is caught by the FP32 check and never ships."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.core.errors import StageError
from toolchain.passes import equalize
from toolchain.passes.equalize import check_same, equalize_onnx, input_ranges, output_ranges
from toolchain.passes.rescale import rescaled_copy


class Chain(nn.Module):
    """Conv -> ReLU -> MaxPool -> Conv -> LeakyReLU -> depthwise Conv -> Conv, then Linear -> ReLU -> Linear,
    with channels whose scales differ by 10^3 (what training and folded BatchNorms leave)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.dw, self.c3 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1)
        self.pool, self.l1, self.l2 = nn.MaxPool2d(2), nn.Linear(4 * 4 * 4, 16), nn.Linear(16, 5)
        torch.manual_seed(0)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, std=0.5)
                nn.init.normal_(m.bias, std=0.1)
        with torch.no_grad():  # outlier channels: the same function, ranges 10^3 apart
            self.c1.weight[:4] *= 1e3
            self.c1.bias[:4] *= 1e3
            self.c2.weight[:, :4] *= 1e-3
            self.l1.weight[8:] *= 1e-3
            self.l1.bias[8:] *= 1e-3
            self.l2.weight[:, 8:] *= 1e3

    def forward(self, x):
        x = self.c2(self.pool(torch.relu(self.c1(x))))
        x = self.c3(self.dw(nn.functional.leaky_relu(x, 0.1)))
        return self.l2(torch.relu(self.l1(torch.flatten(x, 1))))


@pytest.fixture(scope="module")
def chain():
    return Chain().eval()


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)


def _onnx(model, inputs, path):
    torch.onnx.export(
        model,
        (torch.from_numpy(inputs[:1]),),
        str(path),
        dynamo=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    import onnx

    return onnx.load(str(path))


def _run_onnx(proto):
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def _weights(proto):
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def test_onnx_equalization_is_the_same_function_with_balanced_ranges(chain, inputs, tmp_path):
    proto = _onnx(chain, inputs, tmp_path / "chain.onnx")
    before = copy.deepcopy(proto)
    pairs = equalize_onnx(proto)
    # c1 -> c2 (through ReLU and MaxPool), c2 -> dw (LeakyReLU), dw -> c3 (depthwise first), l1 -> l2 (ReLU);
    # c3 -> l1 goes through a flatten (channels and positions mix) and is left alone
    assert len(pairs) == 4
    assert check_same(_run_onnx(before), _run_onnx(proto), inputs) < equalize.MAX_RELATIVE_ERROR
    nodes = {n.name: n for n in proto.graph.node}
    w = _weights(proto)
    first, second = (nodes[p] for p in (pairs[0].first, pairs[0].second))
    r1 = output_ranges(w[first.input[1]], 0)
    r2 = input_ranges(w[second.input[1]], 1, 1)
    # both layers: sqrt(r1 * r2) per channel (chains converge over sweeps)
    np.testing.assert_allclose(r1, r2, rtol=0.02)
    assert r1.max() / r1.min() < 1e2  # the 10^3 outliers are gone
    old = output_ranges(_weights(before)[first.input[1]], 0)
    assert old.max() / old.min() > 1e2


def test_fx_equalization_is_the_same_function_and_fused_pairs_count(chain, inputs):
    from torch.ao.quantization.quantize_fx import fuse_fx

    fused = fuse_fx(torch.fx.symbolic_trace(copy.deepcopy(chain)))
    model, facts = rescaled_copy(fused, inputs, "quantize_torch")
    facts = facts["equalization"]
    assert facts["pairs"] == 4 and facts["fp32_relative_error"] < equalize.MAX_RELATIVE_ERROR
    ranges = output_ranges(equalize.weighted_module(model.l1).weight.detach().numpy(), 0)
    assert ranges.max() / ranges.min() < 1e2  # the 10^3 outliers are gone
    # the input is left as it was
    assert not torch.equal(
        equalize.weighted_module(model.l1).weight, equalize.weighted_module(fused.l1).weight
    )


def test_a_rescale_that_does_not_commute_is_caught_by_the_fp32_check(inputs, monkeypatch):
    """Sigmoid(x / s) != Sigmoid(x) / s: equalizing across it changes the function; the check refuses."""

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
            with torch.no_grad():
                self.a.weight[:2] *= 50

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)))

    from torch.ao.quantization.quantize_fx import fuse_fx

    fused = fuse_fx(torch.fx.symbolic_trace(Bad().eval()))
    original = _fx_pass_through()
    monkeypatch.setattr(equalize, "_fx_pass_through", lambda: original | {torch.sigmoid})
    with pytest.raises(StageError, match="equalization changed the FP32 model's outputs"):
        rescaled_copy(fused, inputs, "quantize_torch")


def _fx_pass_through():
    return equalize._fx_pass_through()


def test_dead_channels_are_left_alone():
    s = equalize.balance(np.array([0.0, 4.0, 1.0]), np.array([3.0, 0.0, 4.0]))
    np.testing.assert_allclose(s, [1.0, 1.0, 0.5])
