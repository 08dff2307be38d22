"""4-bit weights where the target computes them (issue 31, part 2): ONNX Runtime's MatMulNBits on
x86, ExecuTorch's XNNPACK 4-bit groupwise Linear on Snapdragon; offered to Linear-heavy models only,
judged against FP32 at the INT8 thresholds, with `int4_share` and sizes beside the INT8 artifact."""

import re

import numpy as np
import onnx
import pytest

import toolchain

from .conftest import SNAPDRAGON, fast_profile, without_artifacts
from .models import TinyViT, export, train


def _only(profile, tmp_path, keep):
    names = re.findall(r"^\[artifacts\.(\w+)\]", profile.read_text(), flags=re.M)
    return without_artifacts(profile, tmp_path, *(n for n in names if n not in keep))


def _vit(digits_arrays, tmp_path, dim: int, epochs: int):
    import torch

    x_train, x_test, y_train, y_test = digits_arrays
    torch.manual_seed(0)
    model = train(TinyViT(dim=dim, heads=4, layers=2), x_train, y_train, epochs=epochs)
    export(model, x_train, tmp_path / "vit.pt2")
    np.savez(tmp_path / "cal.npz", x=x_train[:128])
    np.savez(tmp_path / "val.npz", x=x_test[:256], y=y_test[:256])
    return tmp_path


def _build(folder, profile, tmp_path):
    report, out = toolchain.build(
        str(folder / "vit.pt2"), str(profile), tmp_path / "out", folder / "cal.npz", folder / "val.npz"
    )
    return report.to_json(), out


def _check_int4(a: dict, stage: str) -> None:
    """Passed, at the INT8 bar (no thresholds of its own), labelled by what it computes, and a size
    option beside INT8, never primary by default (its other layers stay float)."""
    assert a["parity"]["passed"] is True, (a["parity"]["failures"], a["recovery"])
    assert a["eligible"] is False and a["primary"] is False
    facts = a["stage_facts"][stage]
    assert facts["linear_weight_share"] >= 0.5 and a["int4_share"] == facts["int4_share"] > 0.9
    # the patch convolution keeps its float weights: "mixed", saying how much has 4-bit weights
    assert a["precision"] == ("int4" if a["int4_share"] == 1 else "mixed")


def test_x86_gets_matmulnbits_weights_at_about_half_the_int8_file(digits_arrays, tmp_path):
    folder = _vit(digits_arrays, tmp_path, dim=64, epochs=15)
    profile = _only(fast_profile(tmp_path, 128, 256, int4=True), tmp_path, ("onnx_int8", "onnx_int4"))
    data, out = _build(folder, profile, tmp_path)
    by_name = {a["name"]: a for a in data["artifacts"]}
    assert set(by_name) == {"onnx_int8", "onnx_int4"}, data["skipped"]
    int4 = by_name["onnx_int4"]
    _check_int4(int4, "quantize_onnx_int4")
    assert int4["size_bytes"] < 0.7 * by_name["onnx_int8"]["size_bytes"]
    graph = onnx.load(str(out / int4["path"])).graph
    bits = [a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"]
    kept = int4["stage_facts"]["quantize_onnx_int4"]["int8_layers"]  # recovery keeps layers at 8 bits
    assert bits.count(4) == int4["stage_facts"]["quantize_onnx_int4"]["int4_nodes"] > 0
    weights = {i.name for i in graph.initializer}
    assert bits.count(8) == len(kept) and not any(
        n.op_type in ("MatMul", "Gemm") and n.input[1] in weights for n in graph.node
    )  # no weight left in float
    # size and latency beside the build's INT8 artifact, in report.json and the report's lines
    assert int4["vs_int8"]["artifact"] == "onnx_int8" and int4["vs_int8"]["size_ratio"] < 0.7
    assert int4["vs_int8"]["latency_ratio"] == pytest.approx(
        int4["latency_ms"] / by_name["onnx_int8"]["latency_ms"], rel=1e-2
    )
    md = (out / "report.md").read_text()
    assert (
        "| onnx_int4 " in md
        and f"onnx_int4: {int4['vs_int8']['size_ratio']:.2f}x the size of onnx_int8" in md
    )


@pytest.mark.slow  # two XNNPACK lowerings of a 1 M-weight transformer (~1 min here)
def test_snapdragon_pte_with_4_bit_weights_is_at_most_0_6_of_the_int8_pte(digits_arrays, tmp_path):
    folder = _vit(digits_arrays, tmp_path, dim=256, epochs=15)
    base = fast_profile(tmp_path, 128, 256, base=SNAPDRAGON, batch_sizes=None, int4=True)
    data, _ = _build(folder, _only(base, tmp_path, ("pte_int8", "pte_int4")), tmp_path)
    by_name = {a["name"]: a for a in data["artifacts"]}
    assert set(by_name) == {"pte_int8", "pte_int4"}, data["skipped"]
    _check_int4(by_name["pte_int4"], "quantize_int4")
    assert by_name["pte_int4"]["size_bytes"] <= 0.6 * by_name["pte_int8"]["size_bytes"]
    assert by_name["pte_int4"]["vs_int8"]["artifact"] == "pte_int8"
    assert by_name["pte_int4"]["stage_facts"]["lower_executorch"]["delegate_calls"] >= 1


@pytest.mark.slow  # the HTP emulator runs 2 x 128 inputs one at a time (~1 min here)
def test_the_npu_context_with_4_bit_matmul_weights_is_smaller_than_its_int8_one(digits_arrays, tmp_path):
    folder = _vit(digits_arrays, tmp_path, dim=128, epochs=15)
    base = fast_profile(tmp_path, 128, 256, base=SNAPDRAGON, batch_sizes=None, int4=True)
    data, out = _build(folder, _only(base, tmp_path, ("qnn_int8", "qnn_int4")), tmp_path)
    by_name = {a["name"]: a for a in data["artifacts"]}
    assert set(by_name) == {"qnn_int8", "qnn_int4"}, data["skipped"]
    _check_int4(by_name["qnn_int4"], "compile_qnn_int4")
    facts = by_name["qnn_int4"]["stage_facts"]["compile_qnn_int4"]
    assert facts["activations"] == "uint16" and facts["context_bytes"] > 0
    assert by_name["qnn_int4"]["vs_int8"]["artifact"] == "qnn_int8"
    assert by_name["qnn_int4"]["size_bytes"] < by_name["qnn_int8"]["size_bytes"]


def test_4_bit_weights_are_offered_to_linear_heavy_models_only():
    import torch

    from toolchain.core.artifact import Artifact, Kind
    from toolchain.core.context import BuildContext
    from toolchain.core.dataset import Dataset
    from toolchain.core.errors import NotApplicable
    from toolchain.stages.quantize_int4 import QuantizeInt4, QuantizeInt4Options, linear_weight_share

    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    convs = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64 * 36, 4)
    ).eval()
    assert linear_weight_share(convs) == pytest.approx(9216 / (1728 + 64 + 9216 + 4))
    convs[0] = torch.nn.Conv2d(3, 512, 3)  # now the convolution holds most weights
    ctx = BuildContext(None, Dataset(x, None, "test"), (1, 3, 8, 8), True, 2)
    with pytest.raises(NotApplicable, match="Linear weights are 39% of this model's weights"):
        QuantizeInt4(QuantizeInt4Options()).apply(Artifact(Kind.EAGER, "fp32", model=convs), ctx)
    # Linear-heavy, but no layer's input width a multiple of the group: nothing would get 4 bits
    narrow = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 100), torch.nn.Linear(100, 4))
    with pytest.raises(
        NotApplicable, match="no Linear layer's input width is a multiple of group_size = 128"
    ):
        QuantizeInt4(QuantizeInt4Options(group_size=128)).apply(
            Artifact(Kind.EAGER, "fp32", model=narrow), ctx
        )
