"""The ways real networks break INT8, each on a model trained here (the outlier channels of
tests/test_recovery.py are the fourth): what fails is recovered, what is safe stays safe, on any
x86 CPU (the profile's deployment instruction set, not the host's, sets the INT8 settings)."""

import json

import numpy as np
import pytest
import torch

import toolchain
from toolchain.inputs.examples import train

from .conftest import SNAPDRAGON, X86, XAVIER, fast_profile
from .models import (
    bn_after_relu,
    depthwise_hardswish,
    export,
    pitch_frames,
    pitch_spectra,
    pitch_tracker,
    spectral_pitch,
)

WITHIN_2_BINS = """
import numpy as np

def within_2_bins(outputs, labels):  # raw pitch accuracy: within 40 cents of the true pitch
    return float(np.mean(np.abs(outputs.argmax(1) - labels) <= 2))
"""


def _upsampled(x: np.ndarray, size: int) -> np.ndarray:
    return torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear").numpy()


def _folder(tmp_path_factory, name, model, x_cal, x_val, y_val, **labels):
    folder = tmp_path_factory.mktemp(name)
    export(model, x_cal, folder / "model.pt2")
    np.savez(folder / "cal.npz", x=x_cal[:256])
    np.savez(folder / "val.npz", x=x_val, y=y_val, **labels)
    return folder


def _digits_build(digits_arrays, tmp_path_factory, tmp_path, make, size: int) -> tuple:
    """``make()`` trained on digits upsampled to ``size`` x ``size`` (seeded), built for x86."""
    x_train, x_test, y_train, y_test = digits_arrays
    x_train, x_test = _upsampled(x_train, size), _upsampled(x_test, size)
    torch.manual_seed(0)
    model = train(make(), x_train, y_train, epochs=10)
    return _build(
        _folder(tmp_path_factory, make.__name__, model, x_train, x_test[:512], y_test[:512]), tmp_path
    )


def _build(folder, tmp_path, base=X86, extra="", **kwargs):
    profile = fast_profile(
        tmp_path, 256, 512, extra, base=base, batch_sizes=None if base is not X86 else "[1, 2]"
    )
    report, out = toolchain.build(
        str(folder / "model.pt2"),
        str(profile),
        tmp_path / "out",
        folder / "cal.npz",
        folder / "val.npz",
        **kwargs,
    )
    return report, json.loads((out / "report.json").read_text())


# recovery on both x86 INT8 backends: test_recovery.py; BatchNorm after ReLU: the BN1d test below
@pytest.mark.slow
def test_batchnorm_after_relu_fails_int8_and_is_recovered_on_both_x86_backends(
    digits_arrays, tmp_path_factory, tmp_path
):
    """Conv -> ReLU -> BatchNorm: the BatchNorm stays a layer of its own after a ReLU, and a
    near-dead channel (variance ~1e-9) gives it a gain of ~300: its INT8 output range is
    dominated by that channel (ONNX Runtime: SQNR ~2 dB, top-1 agreement ~66 %)."""
    report, data = _digits_build(digits_arrays, tmp_path_factory, tmp_path, bn_after_relu, 32)
    artifacts = {a["name"]: a for a in data["artifacts"]}
    # ONNX Runtime's all-INT8 model is far below the bar on any CPU (66 % top-1 agreement here)
    assert artifacts["onnx_int8"]["recovery"]["before"]["top1_agreement"] < 0.9
    for name in ("torch_int8", "onnx_int8"):
        a = artifacts[name]
        assert a["parity"]["passed"] is True and a["parity"]["top1_agreement"] >= 0.99, a["parity"]
        if a["recovery"] is None:
            # torch's 7-bit activations miss by little (98.0 % here, 99 % the bar): another CPU's kernels
            # may keep it over the bar as built, and then recovery must not run
            assert name == "torch_int8" and a["precision"] == "int8"
            continue
        assert a["recovery"]["before"]["top1_agreement"] < 0.99, a["recovery"]["before"]  # all-INT8 fails
        assert a["recovery"]["status"] == "recovered", a["recovery"]["summary"]
        # a CNN has no LayerNorm to migrate from
        assert not any("smooth" in t["fixes"] for t in a["recovery"]["attempts"])
        # which rung recovers it (a calibration, a fix, float layers) depends on the model trained on this CPU
        assert a["precision"] == ("mixed" if a["float_layers"] else "int8"), (
            a["precision"],
            a["float_layers"],
        )
    assert report.passed


def test_depthwise_hardswish_passes_with_the_deployment_isa_settings(
    digits_arrays, tmp_path_factory, tmp_path
):
    """MobileNet-style blocks lose ~17 pt with full-range U8S8 weights on AVX2 CPUs without VNNI
    (16-bit intermediate sums saturate). The profile deploys to `avx2`, so its INT8 settings are the
    ones exact on every x86 CPU (7-bit weights), whatever this host has: no recovery needed."""
    report, data = _digits_build(digits_arrays, tmp_path_factory, tmp_path, depthwise_hardswish, 16)
    assert data["reference"]["accuracy"] > 0.9
    for name in ("torch_int8", "onnx_int8"):
        a = next(a for a in data["artifacts"] if a["name"] == name)
        assert a["parity"]["passed"] is True and a["recovery"] is None and a["precision"] == "int8", a[
            "parity"
        ]
        assert (
            a["stage_facts"]["quantize_torch" if name == "torch_int8" else "quantize_onnx"]["reduce_range"]
            is True
        )
    assert report.passed


@pytest.fixture(scope="module")
def pitch(tmp_path_factory):
    x, y = pitch_frames(1000, 0)
    x_val, y_val = pitch_frames(512, 1)
    folder = _folder(tmp_path_factory, "pitch", pitch_tracker(x, y), x, x_val, y_val)
    (folder / "metrics.py").write_text(WITHIN_2_BINS)
    return folder


# on Xavier nightly (`make test-full`): its Q/DQ path is in the suite on the other models
@pytest.mark.parametrize(
    "base,names",
    [(X86, ("torch_int8", "onnx_int8")), pytest.param(XAVIER, ("onnx_int8_qdq",), marks=pytest.mark.slow)],
    ids=["x86", "xavier"],
)
def test_a_pitch_tracker_with_long_1d_kernels_holds_its_pitch_accuracy_in_int8(pitch, tmp_path, base, names):
    """A 511-tap Conv1d over raw audio, Conv -> ReLU -> BatchNorm blocks, 120 sigmoid outputs of
    20 cents each. Top-1 agreement is the wrong yardstick here (INT8 moves the arg-max to the
    neighbouring bin on a few % of frames at SQNR ~35 dB; no layer dominates, so no float layer
    brings it to 99 %: see the next test): the pitch tracker's own metric, raw pitch accuracy within
    2 bins, decides. Snapdragon's artifacts: the slow tests below."""
    report, data = _build(
        pitch, tmp_path, base, metric=str(pitch / "metrics.py") + ":within_2_bins", max_metric_drop=0.01
    )
    assert data["metric"]["fp32"] > 0.95
    for name in names:
        a = next(a for a in data["artifacts"] if a["name"] == name)
        assert a["parity"]["passed"] is True and a["parity"]["metric"]["passed"] is True, a["parity"]
        assert a["parity"]["sqnr_db"] > 25  # the outputs are close; only near-ties between bins move
    assert report.passed


def test_a_pitch_estimator_with_layernorm_over_channels_and_frequency_gets_onnx_int8(
    tmp_path_factory, tmp_path
):
    """LayerNorm over (channels, frequency) and a Toeplitz Conv1d (kernel 2F-1, zero-padded), a softmax
    over the pitch bins (PESTO's traits). ONNX Runtime's quantizer raised "The truth value of an array
    with more than one element is ambiguous" on the LayerNorms' 2-D bias with per-channel weights, and
    onnx_int8 was skipped: those norms stay in float (ONNX Runtime's CPU has no INT8 LayerNorm)."""
    x, y = pitch_spectra(1024, 0)
    x_val, y_val = pitch_spectra(512, 1)
    folder = _folder(tmp_path_factory, "spectral", spectral_pitch(x, y, epochs=12), x, x_val, y_val)
    report, data = _build(folder, tmp_path)
    assert data["reference"]["accuracy"] > 0.9
    onnx_int8 = next((a for a in data["artifacts"] if a["name"] == "onnx_int8"), None)
    assert onnx_int8 is not None, data["skipped"]
    assert (
        len(onnx_int8["stage_facts"]["quantize_onnx"]["float_norms"]) == 2
    )  # both norms, named in the report
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    stages = manifest["artifacts"]["onnx_int8"]["stages"]
    facts = next(s["facts"] for s in stages if s["stage"] == "quantize_onnx")
    assert facts["float_layers"] == [] and facts["quantize_nodes"] > 0, facts  # every Conv and Gemm INT8
    assert onnx_int8["precision"] == "int8"
    assert onnx_int8["parity"]["passed"] is True, onnx_int8["parity"]
    assert report.passed


def test_the_pitch_trackers_top1_failure_is_explained_by_fp32s_near_ties_and_the_noise_it_would_take(
    pitch, tmp_path
):
    """Judged by exact top-1 agreement (no metric, recovery off), both x86 INT8 artifacts fail, and the
    report says why in numbers: FP32's top two bins are within ~0.001 on 1 % of the frames, and the
    artifact's error between them (RMS) predicts the agreement it measured. The bar does not move."""
    report, data = _build(pitch, tmp_path, extra="[recovery]\nenabled = false\n")
    assert report.passed is False
    for name in ("torch_int8", "onnx_int8"):
        a = next(a for a in data["artifacts"] if a["name"] == name)
        out = a["parity"]["outputs"][0]
        ties = out["near_ties"]
        assert a["parity"]["passed"] is False and ties is not None, a["parity"]
        assert ties["share"] == pytest.approx(0.01) and 0 < ties["gap"] < ties["noise"]
        # The prediction sums per-frame swap probabilities; the measured agreement is one draw of those
        # Bernoulli frames, so their difference is bounded by the binomial spread at this sample size
        # (variance <= p(1-p)/n), not by a fixed number that moves with the CPU's kernels (a Zen 4 host
        # measured 92.97 % against 95.22 % predicted: 2.0 standard errors).
        n, measured = a["parity"]["samples"], out["top1_agreement"]
        spread = (measured * (1 - measured) / n) ** 0.5
        assert abs(ties["predicted"] - measured) <= 4 * spread, (ties, measured, n)
        assert ties["predicted"] < 0.99  # the noise alone predicts the miss: it explains the failure
        assert ties["noise_cut_db"] > 3  # INT8 with every layer in it is far from the bar, by this much noise
        assert f"- {name}: top-1 agreement" in (tmp_path / "out" / "report.md").read_text()
        assert f"<li class='ties'>{name}: top-1 agreement" in (tmp_path / "out" / "report.html").read_text()
    assert (
        next(a for a in data["artifacts"] if a["name"] == "onnx_fp32")["parity"]["outputs"][0]["near_ties"]
        is None
    )


@pytest.fixture(scope="module")
def pitch_on_snapdragon(pitch, tmp_path_factory):
    _, data = _build(
        pitch,
        tmp_path_factory.mktemp("pitch_snapdragon"),
        SNAPDRAGON,
        metric=str(pitch / "metrics.py") + ":within_2_bins",
        max_metric_drop=0.01,
    )
    return data


@pytest.mark.slow
def test_the_pitch_tracker_on_snapdragon_qnnpack(pitch_on_snapdragon):
    a = next(a for a in pitch_on_snapdragon["artifacts"] if a["name"] == "ptl_int8")
    assert a["parity"]["passed"] is True, a["parity"]


@pytest.mark.slow
def test_the_pitch_tracker_on_snapdragon_xnnpack(pitch_on_snapdragon):
    """Its BatchNorm1d layers after ReLUs become depthwise convolutions before quantization (ExecuTorch's
    XNNPACK lowering refused them once quantized: 'Weight and Input should both be quantized')."""
    a = next((a for a in pitch_on_snapdragon["artifacts"] if a["name"] == "pte_int8"), None)
    assert a is not None, pitch_on_snapdragon.get("skipped")
    assert a["parity"]["passed"] is True and a["parity"]["metric"]["passed"] is True, a["parity"]
    assert len(a["stage_facts"]["quantize_pt2e"]["batchnorm1d_as_conv"]) == 4


def test_a_batchnorm1d_after_a_relu_becomes_the_depthwise_conv_it_computes_and_lowers_to_xnnpack():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from toolchain.passes.batchnorm import batchnorm1d_as_convs

    torch.manual_seed(0)
    # the last one follows a conv: folded
    model = torch.nn.Sequential(
        torch.nn.Conv1d(1, 8, 9, padding=4),
        torch.nn.ReLU(),
        torch.nn.BatchNorm1d(8),
        torch.nn.Conv1d(8, 4, 3),
        torch.nn.BatchNorm1d(4),
    )
    with torch.no_grad():
        (
            model[2].running_mean.uniform_(-1, 1),
            model[2].running_var.uniform_(0.5, 2),
            model[2].weight.uniform_(-2, 2),
        )
    x = (torch.randn(4, 1, 64),)
    gm = torch.export.export(model.eval(), x).module()
    expected = gm(*x)
    assert batchnorm1d_as_convs(gm) == ["2"]
    assert not any("batch_norm" in str(n.target) and n.args[0].name == "relu" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(*x), expected, rtol=1e-5, atol=1e-5)
    prepared = prepare_pt2e(
        gm, XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    )
    prepared(*x)
    to_edge_transform_and_lower(
        torch.export.export(convert_pt2e(prepared), x), partitioner=[XnnpackPartitioner()]
    ).to_executorch()
