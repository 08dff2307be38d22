"""SmoothQuant's LayerNorm -> Linear scale migration computes the same function in FP32, takes the
outlier channels out of the activations the Linears read, on ONNX graphs and FX modules, and leaves
a LayerNorm alone when anything but a Linear reads it (a post-norm residual)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from toolchain.core.errors import StageError
from toolchain.passes import smooth
from toolchain.passes.bias_correction import exposing
from toolchain.passes.equalize import check_same
from toolchain.passes.rescale import rescaled_copy
from toolchain.passes.smooth import smooth_onnx

K = 30.0  # the outlier factor: the same function, two channels 30x larger at each pre-norm's output


class Blocks(nn.Module):
    """Pre-norm blocks (a LayerNorm read by two Linears; one read through a transpose; one through a
    mean over tokens) and a post-norm LayerNorm that also feeds its residual, with outlier channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.n1, self.q, self.k = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.n2, self.f = nn.LayerNorm(8), nn.Linear(8, 16)
        self.post, self.g = nn.LayerNorm(16), nn.Linear(16, 16)
        self.n3, self.head = nn.LayerNorm(16), nn.Linear(16, 3)
        with torch.no_grad():
            for norm, readers in (
                (self.n1, (self.q, self.k)),
                (self.n2, (self.f,)),
                (self.post, (self.g,)),
                (self.n3, (self.head,)),
            ):
                norm.weight.normal_(1.0, 0.2)
                norm.bias.normal_(0.0, 0.2)
                norm.weight[:2] *= K
                norm.bias[:2] *= K
                for r in readers:
                    r.weight[:, :2] /= K

    def forward(self, x):  # (n, 4 tokens, 8)
        h = self.n1(x)
        x = x + self.q(h) * torch.sigmoid(self.k(h))
        y = self.f(self.n2(x).transpose(0, 1)).transpose(0, 1)  # (n, 4, 16)
        z = self.post(y)
        z = z + self.g(z)  # post-norm: the residual reads the norm's output too
        return self.head(self.n3(z).mean(1))


@pytest.fixture(scope="module")
def model():
    return Blocks().eval()


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).normal(size=(64, 4, 8)).astype(np.float32)


def _onnx(model, inputs, path):
    import onnx

    torch.onnx.export(
        model,
        (torch.from_numpy(inputs[:1]),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    return onnx.load(str(path))


def _session(proto):
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})


def _spread(values: np.ndarray) -> float:
    """How far the largest channel's range is above the median channel's."""
    m = np.abs(values).reshape(-1, values.shape[-1]).max(axis=0)
    return float(m.max() / np.median(m))


def test_onnx_smoothing_is_the_same_function_without_the_outlier_channels(model, inputs, tmp_path):
    proto = _onnx(model, inputs, tmp_path / "blocks.onnx")
    before = copy.deepcopy(proto)
    norms = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 4
    run = lambda m, tensors: _session(exposing(m, tensors))(inputs)
    readers = {}
    for n in proto.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            readers[n.name] = n.input[0]
    spread_before = {name: _spread(v) for name, v in zip(readers, run(before, list(readers.values())))}
    groups = smooth_onnx(proto, run)
    by_norm = {g.norm: g for g in groups}
    assert len(groups) == 3 and norms[2].name not in by_norm  # the post-norm LayerNorm is left alone
    assert len(by_norm[norms[0].name].layers) == 2  # both Linears reading it take the scales
    assert all(g.alpha is not None for g in groups)
    assert check_same(_session(before), _session(proto), inputs) < 1e-5  # the same function
    spread_after = {name: _spread(v) for name, v in zip(readers, run(proto, list(readers.values())))}
    for g in groups:
        for layer in g.layers:
            assert spread_before[layer] > 10 and spread_after[layer] < spread_before[layer] / 5, (
                layer,
                spread_before,
                spread_after,
            )


def test_fx_smoothing_is_the_same_function_and_reports_each_group(model, inputs):
    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    smoothed, facts = rescaled_copy(gm, inputs, "quantize_torch", equalize=False, smooth=True)
    facts = facts["smoothing"]
    assert facts["groups"] == 3 and facts["fp32_relative_error"] < 1e-5
    assert [layer.split(" (")[0] for layer in facts["layers"]] == ["n1 -> q, k", "n2 -> f", "n3 -> head"]
    assert torch.equal(smoothed.post.weight, model.post.weight) and torch.equal(
        smoothed.g.weight, model.g.weight
    )
    # the outliers moved into q and k
    assert smoothed.n1.weight[:2].abs().max() < model.n1.weight[:2].abs().max() / 3
    assert not torch.equal(gm.n1.weight, smoothed.n1.weight)  # the input model is left as it was


def test_a_smoothing_that_changes_the_function_is_caught_by_the_fp32_check(model, inputs, monkeypatch):
    """Scaling the post-norm LayerNorm changes what its residual adds; forced
    eligible, the check refuses it."""
    readers = smooth._fx_readers

    def linears_only(gm, node):
        if node.target == "post":
            return ["g"]
        return readers(gm, node)

    monkeypatch.setattr(smooth, "_fx_readers", linears_only)
    with pytest.raises(StageError, match="smoothing changed the FP32 model's outputs"):
        rescaled_copy(
            torch.fx.symbolic_trace(copy.deepcopy(model)),
            inputs,
            "quantize_torch",
            equalize=False,
            smooth=True,
        )


def _product_error(x, w, scale):
    qx = smooth._fake_quant_activation(x / scale, 8)
    return np.square(qx @ smooth._fake_quant_weight(w * scale, 8).T - x @ w.T).sum()


def test_the_strength_is_chosen_by_the_quantized_product_error():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 16))
    x = rng.normal(size=(512, 16))
    x[:, 3] *= 50  # one outlier channel
    s, alpha = smooth.choose(x, [w])
    assert alpha in smooth.ALPHAS and s[3] > 5 * np.median(s)
    assert _product_error(x, w, s) < _product_error(x, w, np.ones(16)) / 4
    for alpha in smooth.ALPHAS:  # the best of the strengths tried
        assert _product_error(x, w, s) <= _product_error(
            x, w, smooth.migration_scales(np.abs(x).max(0), np.abs(w).max(0), alpha)
        )
    # no outliers, weights whose columns differ: whatever is chosen is never worse than leaving it
    flat, uneven = rng.normal(size=(512, 16)), w * rng.uniform(0.1, 3, size=16)
    s_flat, _ = smooth.choose(flat, [uneven])
    assert _product_error(flat, uneven, s_flat) <= _product_error(flat, uneven, np.ones(16))


def test_onnx_rescale_measures_tokens_first_tensors_in_batches_and_writes_only_a_checked_file(
    model, tmp_path
):
    """`f` reads a tokens-first (4, N, 8) tensor: 100 inputs in batches of 32 cannot be stacked on
    axis 0, so each batch is measured as rows of channels. The output file exists only once checked."""
    from toolchain.passes.rescale import rescale_onnx_into

    x = np.random.default_rng(1).normal(size=(100, 4, 8)).astype(np.float32)
    source = tmp_path / "blocks.onnx"
    _onnx(model, x, source)
    out = tmp_path / "smoothed.onnx"
    runner = lambda m: _session(m if hasattr(m, "SerializeToString") else __import__("onnx").load(str(m)))
    facts = rescale_onnx_into(source, out, runner, x, "quantize_onnx", equalize=False, smooth=True)
    assert facts["smoothing"]["groups"] == 3 and facts["smoothing"]["fp32_relative_error"] < 1e-5
    assert out.exists() and not (tmp_path / "unchecked-smoothed.onnx").exists()
    bad = tmp_path / "refused.onnx"
    with pytest.raises(StageError, match="smoothing changed the FP32 model's outputs"):
        broken = lambda m: (
            lambda v: [t + float(str(m).endswith("unchecked-refused.onnx")) for t in runner(m)(v)]
        )
        # the candidate computes otherwise
        rescale_onnx_into(source, bad, broken, x, "quantize_onnx", equalize=False, smooth=True)
    # never left for a later variant to reuse
    assert not bad.exists() and not (tmp_path / "unchecked-refused.onnx").exists()
