"""Quantization-aware training: `toolchain.qat.prepare` gives a model the fake-quantization of the
target artifact's own quantizer, the user fine-tunes it, and `build --qat` converts what it learned
instead of calibrating. The model: tests.models.dead_channel_outliers, whose post-training INT8 misses
parity on each backend here even after recovery (with no layer kept in float)."""

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

import toolchain
import toolchain.qat
from tests.conftest import SNAPDRAGON, X86, XAVIER, cli, fast_profile, without_artifacts
from tests.models import dead_channel_outliers, export
from toolchain.bench import artifact_of
from toolchain.core.qat import QatError, read_qat_state
from toolchain.passes.observers import is_fake_quantize
from toolchain.runtimes import load_runner
from toolchain.sensitivity import measure_build


def with_outliers(tmp_path_factory, digits, digits_arrays, k: float) -> dict:
    x_train, x_test, y_train, y_test = digits_arrays
    tmp = tmp_path_factory.mktemp("qat")
    model = dead_channel_outliers(torch.export.load(str(digits["model"])).module(), k)
    export(model, x_train, tmp / "model.pt2")
    np.savez(tmp / "calib.npz", x=x_train[:256])
    np.savez(tmp / "other_calib.npz", x=x_train[256:512])
    np.savez(tmp / "val.npz", x=x_test, y=y_test)
    return {"dir": tmp, "model": model, "x": x_train, "y": y_train}


@pytest.fixture(scope="module")
def outliers(tmp_path_factory, digits, digits_arrays):
    """The built-in example's trained CNN (the session's), given dead-channel weight outliers."""
    return with_outliers(tmp_path_factory, digits, digits_arrays, 100.0)


@pytest.fixture(scope="module")
def outliers_7bit(tmp_path_factory, digits, digits_arrays):
    """The same with outliers half as large, for 7-bit weights (-64..64): the same outlier-to-step ratio
    as the 8-bit case. (With k = 100 a 7-bit grid rounds every real weight of those rows to zero.)"""
    return with_outliers(tmp_path_factory, digits, digits_arrays, 50.0)


def only(tmp_path, base, *artifacts: str):
    """``base``'s fast profile with ``artifacts`` alone, and recovery without float layers: whatever
    recovery does, every layer stays INT8."""
    openvino = any(a.startswith("openvino") for a in artifacts)
    fast = fast_profile(
        tmp_path, 256, 594, base=base, extra="[recovery]\nmax_float_layers = 0\n", openvino=openvino
    )
    names = re.findall(r"^\[artifacts\.(\w+)\]", fast.read_text(), flags=re.M)
    return without_artifacts(fast, tmp_path, *(n for n in names if n not in artifacts))


def finetune(qat_model, model, x, y, epochs: int = 4) -> None:
    """docs/qat.md's loop: the labels and the FP32 model's own outputs as targets."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        teacher = model(xs)
    opt = torch.optim.Adam(qat_model.parameters(), lr=3e-3)
    qat_model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs)).split(64):
            opt.zero_grad()
            out = qat_model(xs[idx])
            (nn.functional.mse_loss(out, teacher[idx]) + nn.functional.cross_entropy(out, ys[idx])).backward()
            opt.step()
    torch.set_num_threads(threads)


def build(outliers, profile, out, calib="calib.npz", qat=None, name=None):
    """The build's report and its one artifact (or the one called ``name``)."""
    d = outliers["dir"]
    report, _ = toolchain.build(
        str(d / "model.pt2"), str(profile), d / out, calib=d / calib, val=d / "val.npz", qat=qat
    )
    if name:
        return report, next(a for a in report.artifacts if a.name == name)
    (artifact,) = report.artifacts
    return report, artifact


def qat_passes_where_ptq_fails(outliers, tmp_path, base, name, also=(), min_db=18.0):
    """The issue's test: post-training INT8 fails after recovery; fine-tuned by QAT it passes, with the
    QAT state's ranges and weights in the artifact. Returns both builds' artifacts and the state's path.
    ``also``: other artifacts the profile needs (the NVIDIA profile's engine plan names onnx_fp32)."""
    profile = only(tmp_path, base, name, *also)
    _, ptq = build(outliers, profile, f"ptq-{name}", name=name)
    assert ptq.parity.passed is False and ptq.ranges == "calibration"
    assert ptq.recovery["status"] == "failed" and len(ptq.recovery["attempts"]) >= 2
    assert ptq.parity.outputs[0].sqnr_db < 13.0  # 10 dB here; recovery's best 12.4

    qat_model = toolchain.qat.prepare(
        str(outliers["dir"] / "model.pt2"), str(profile), outliers["dir"] / "calib.npz", artifact=name
    )
    fake = {n: m for n, m in qat_model.named_modules() if is_fake_quantize(m)}
    frozen = {n for n, m in fake.items() if not m.observer_enabled[0]}
    assert frozen and frozen != set(fake)  # activation ranges fixed, weight scales still observing
    finetune(qat_model, outliers["model"], outliers["x"], outliers["y"])
    state = toolchain.qat.save(qat_model, tmp_path / "qat.pt")
    report, qat = build(outliers, profile, f"qat-{name}", qat=state, name=name)
    assert qat.parity.passed, qat.parity.failures
    assert qat.parity.outputs[0].sqnr_db > min_db  # 22 dB here for the torch and ExecuTorch artifacts
    assert qat.ranges == "qat" and qat.recovery is None
    assert report.qat["artifact"] == name and report.to_json()["qat"]["sha256"]
    return ptq, qat, state


def outputs(folder, x, name=None) -> np.ndarray:
    """What the build's first artifact in ``folder`` (or the one called ``name``) computes for ``x``, run as
    the build ran it."""
    entries = json.loads((folder / "report.json").read_text())["artifacts"]
    entry = next(e for e in entries if e["name"] == name) if name else entries[0]
    return load_runner(artifact_of(folder, entry), entry["runtime"], 1)(x)[0]


def test_qat_x86_torch_int8(outliers, tmp_path):
    qat_passes_where_ptq_fails(outliers, tmp_path, X86, "torch_int8")
    # the build calibrates nothing for it: other calibration data, the same outputs (and for
    # post-training INT8 the same change gives other outputs: the comparison sees calibration)
    profile, d, x = tmp_path / "without-fast.toml", outliers["dir"], outliers["x"][:64]
    build(outliers, profile, "qat-other-calib", calib="other_calib.npz", qat=tmp_path / "qat.pt")
    assert np.array_equal(outputs(d / "qat-torch_int8", x), outputs(d / "qat-other-calib", x))
    build(outliers, profile, "ptq-other-calib", calib="other_calib.npz")
    assert not np.array_equal(outputs(d / "ptq-torch_int8", x), outputs(d / "ptq-other-calib", x))
    # `toolchain sensitivity` measures the shipped (QAT) model, not a re-calibrated one
    measure_build(d / "qat-torch_int8")
    baseline = json.loads((d / "qat-torch_int8" / "sensitivity" / "torch_int8.json").read_text())["baseline"]
    assert baseline["sqnr_db"] > 18.0 and not baseline["failures"]


def test_qat_x86_onnx_int8_and_its_openvino_ir(outliers_7bit, tmp_path):
    """ONNX Runtime's Q/DQ model: uint8 activations, int8 per-channel weights in 7 bits (`isa = "avx2"`);
    the build exports the fine-tuned model with its learned Q/DQ."""
    import onnx

    from toolchain.stages.quantize_onnx import float_weight_share

    outliers = outliers_7bit
    ptq, qat, state = qat_passes_where_ptq_fails(outliers, tmp_path, X86, "onnx_int8")
    facts = qat.stage_facts["quantize_onnx"]
    assert facts["ranges"] == "qat" and facts["reduce_range"] is True
    graph = onnx.load(str(outliers["dir"] / "qat-onnx_int8" / "onnx_int8.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 5 and float_weight_share(graph) == 0.0
    assert not any(n.metadata_props or n.doc_string for n in graph.node)  # no exporter traces (host paths)
    # OpenVINO's IR of the same Q/DQ model takes the state too; neither calibrates: other calibration data,
    # the same outputs (and for post-training INT8 other outputs)
    d, x = outliers["dir"], outliers["x"][:64]
    (tmp_path / "both").mkdir()
    both = only(tmp_path / "both", X86, "onnx_int8", "openvino_int8")
    report, _ = build(outliers, both, "qat-other-calib", calib="other_calib.npz", qat=state, name="onnx_int8")
    assert {a.name: a.ranges for a in report.artifacts} == {"onnx_int8": "qat", "openvino_int8": "qat"}
    assert all(a.parity.passed for a in report.artifacts)
    assert np.array_equal(outputs(d / "qat-onnx_int8", x), outputs(d / "qat-other-calib", x, "onnx_int8"))
    build(outliers, tmp_path / "without-fast.toml", "ptq-onnx-other-calib", calib="other_calib.npz")
    assert not np.array_equal(outputs(d / "ptq-onnx_int8", x), outputs(d / "ptq-onnx-other-calib", x))


def test_qat_xavier_onnx_int8_qdq(outliers, tmp_path):
    """TensorRT's explicit-INT8 Q/DQ model: int8 activations with zero-point 0 (all TensorRT takes),
    fine-tuned; no calibration cache is written from it (its tensors are not onnx_fp32's)."""
    import onnx
    from onnx import numpy_helper

    _, qat, _ = qat_passes_where_ptq_fails(outliers, tmp_path, XAVIER, "onnx_int8_qdq", also=("onnx_fp32",))
    folder = outliers["dir"] / "qat-onnx_int8_qdq"
    graph = onnx.load(str(folder / "onnx_int8_qdq.onnx")).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    zero_points = [weights[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert max(int(o.version) for o in onnx.load(str(folder / "onnx_int8_qdq.onnx")).opset_import) <= 17
    engine = json.loads((folder / "report.json").read_text())["engine"]
    assert engine["calibration_cache"] is None and not (folder / "calibration.cache").exists()


def test_a_transformers_qat_onnx_model_keeps_its_linears_int8(digits_arrays, tmp_path):
    """A Linear on a sequence (rank-3 input) exports as Transpose(W) -> MatMul: in the QAT model W is a
    DequantizeLinear of int8 data, and the transpose is folded into that data so the MatMul reads the
    DequantizeLinear as ONNX Runtime's fusion (and the INT8 count) expect. Prepared and built without
    fine-tuning: this is about the file, not the accuracy."""
    from tests.models import tiny_vit

    x_train, x_test, y_train, y_test = digits_arrays
    export(tiny_vit(x_train[:512], y_train[:512], epochs=2), x_train, tmp_path / "vit.pt2")
    np.savez(tmp_path / "calib.npz", x=x_train[:64])
    np.savez(tmp_path / "val.npz", x=x_test[:64], y=y_test[:64])
    profile = only(tmp_path, X86, "onnx_int8")
    qat_model = toolchain.qat.prepare(
        str(tmp_path / "vit.pt2"), str(profile), tmp_path / "calib.npz", "onnx_int8"
    )
    state = toolchain.qat.save(qat_model, tmp_path / "qat.pt")
    report, _ = toolchain.build(
        str(tmp_path / "vit.pt2"),
        str(profile),
        tmp_path / "out",
        tmp_path / "calib.npz",
        tmp_path / "val.npz",
        qat=state,
    )
    (artifact,) = report.artifacts
    facts = artifact.stage_facts["quantize_onnx"]
    assert artifact.ranges == "qat" and facts["weight_transposes_folded"] >= 4
    assert artifact.int8_share > 0.8, artifact.int8_share  # the Linears' multiply-accumulates, counted INT8


@pytest.mark.slow
def test_qat_snapdragon_ptl_int8(outliers, tmp_path):
    """The qnnpack quantizer of the lite-interpreter file, named with `artifact` (the same stage as x86's
    torch_int8, another engine: make test-full)."""
    profile = only(tmp_path, SNAPDRAGON, "ptl_int8")
    qat_model = toolchain.qat.prepare(
        str(outliers["dir"] / "model.pt2"), str(profile), outliers["dir"] / "calib.npz", artifact="ptl_int8"
    )
    assert qat_model.meta["toolchain_qat"]["settings"]["engine"] == "qnnpack"
    qat_passes_where_ptq_fails(outliers, tmp_path, SNAPDRAGON, "ptl_int8")


@pytest.mark.slow
def test_qat_snapdragon_pte_int8(outliers, tmp_path):
    """pt2e's XNNPACK quantizer (the Snapdragon profile's first INT8 artifact, so prepare's default)."""
    qat_passes_where_ptq_fails(outliers, tmp_path, SNAPDRAGON, "pte_int8")


@pytest.fixture(scope="module")
def untrained_state(outliers, tmp_path_factory):
    """An x86 QAT state saved straight after prepare: enough for what the build checks of it."""
    tmp = tmp_path_factory.mktemp("state")
    profile = only(tmp, X86, "torch_int8")
    qat_model = toolchain.qat.prepare(
        str(outliers["dir"] / "model.pt2"), str(profile), outliers["dir"] / "calib.npz"
    )
    return toolchain.qat.save(qat_model, tmp / "qat.pt"), profile


def test_a_qat_state_for_another_target_model_or_no_state_is_one_error_and_no_folder(
    outliers, untrained_state, digits, tmp_path
):
    state, profile = untrained_state
    d = outliers["dir"]
    cases = [
        (str(d / "model.pt2"), SNAPDRAGON, state, "prepared for target `x86_fbgemm`"),
        (str(digits["model"]), profile, state, "prepared from another model"),
        (str(d / "model.pt2"), profile, d / "model.pt2", "is not a QAT state"),
        (str(d / "model.pt2"), profile, d / "missing.pt", "does not exist"),
    ]
    for i, (model, target, qat, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(QatError, match=re.escape(message)):
            toolchain.build(model, str(target), out, calib=d / "calib.npz", qat=qat)
        assert not out.exists()
    # the artifact it was prepared for cannot take it (8-bit activations on a VNNI CPU, 7-bit when it was
    # prepared): the build fails, saying why, rather than quietly calibrating
    vnni = tmp_path / "vnni.toml"
    vnni.write_text(profile.read_text().replace('isa = "avx2"', 'isa = "avx512_vnni"', 1))
    with pytest.raises(QatError, match="not used by torch_int8: not used: prepared with reduce_range = True"):
        toolchain.build(str(d / "model.pt2"), str(vnni), tmp_path / "vnni", calib=d / "calib.npz", qat=state)
    assert not (tmp_path / "vnni").exists()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(state.read_bytes()[:200])
    with pytest.raises(QatError, match="is not a QAT state"):
        read_qat_state(damaged)


def test_prepare_needs_calibration_data_and_an_artifact_it_can_prepare(outliers, untrained_state):
    _, profile = untrained_state
    model = str(outliers["dir"] / "model.pt2")
    with pytest.raises(QatError, match="calib"):
        toolchain.qat.prepare(model, str(profile))
    with pytest.raises(QatError, match=r"`onnx_fp32` is not an artifact .* valid: torch_int8, onnx_int8"):
        toolchain.qat.prepare(model, str(X86), outliers["dir"] / "calib.npz", artifact="onnx_fp32")
    with pytest.raises(QatError, match="save\\(\\) takes the model toolchain.qat.prepare returned"):
        toolchain.qat.save(outliers["model"], outliers["dir"] / "no.pt")


def test_finetune_calls_the_users_training_function_from_its_file(outliers, untrained_state, tmp_path):
    """`toolchain qat --train FILE.py:function`'s path, in process: the function gets the prepared model in
    training mode; an error inside it is one line naming the user's file and line."""
    _, profile = untrained_state
    d = outliers["dir"]
    train = tmp_path / "train.py"
    train.write_text(
        "import torch\n"
        "def one_step(model):\n"
        "    assert model.training\n"
        "    opt = torch.optim.SGD(model.parameters(), lr=1e-3)\n"
        "    model(torch.rand(8, 1, 8, 8)).sum().backward()\n"
        "    opt.step()\n"
        "def broken(model):\n"
        "    raise ValueError('no data here')\n"
        "def a_loss(model):\n"
        "    return 0.5\n"
    )
    path = toolchain.qat.finetune(
        str(d / "model.pt2"), f"{train}:one_step", tmp_path / "s.pt", str(profile), d / "calib.npz"
    )
    state = read_qat_state(path)
    assert (state.target, state.artifact, state.stage) == ("x86_fbgemm", "torch_int8", "quantize_torch")
    with pytest.raises(QatError, match="returned float: return nothing"):
        toolchain.qat.finetune(
            str(d / "model.pt2"), f"{train}:a_loss", tmp_path / "l.pt", str(profile), d / "calib.npz"
        )
    with pytest.raises(QatError, match=r"raised ValueError: no data here \(train.py:8\)"):
        toolchain.qat.finetune(
            str(d / "model.pt2"), f"{train}:broken", tmp_path / "b.pt", str(profile), d / "calib.npz"
        )


@pytest.mark.slow
def test_the_cli_prepares_trains_and_builds(outliers, tmp_path):
    """`toolchain qat` then `toolchain build --qat`, as a user runs them."""
    profile = only(tmp_path, X86, "torch_int8")
    d = outliers["dir"]
    train = tmp_path / "train.py"
    train.write_text(
        "import numpy as np, torch\n"
        f"DATA = np.load({str(d / 'calib.npz')!r})\n"
        "def finetune(model):\n"
        "    x = torch.from_numpy(DATA['x'])\n"
        "    opt = torch.optim.Adam(model.parameters(), lr=1e-3)\n"
        "    for idx in torch.arange(len(x)).split(64):\n"
        "        opt.zero_grad()\n"
        "        model(x[idx]).square().mean().backward()\n"
        "        opt.step()\n"
    )
    assert "fake-quantization" in cli("qat", "--help").stdout
    made = cli(
        "qat",
        str(d / "model.pt2"),
        "-t",
        str(profile),
        "--calib",
        str(d / "calib.npz"),
        "--train",
        f"{train}:finetune",
        "-o",
        str(tmp_path / "qat.pt"),
    )
    assert made.returncode == 0, made.stderr
    assert "--qat" in made.stdout and (tmp_path / "qat.pt").is_file()
    built = cli(
        "build",
        str(d / "model.pt2"),
        "-t",
        str(profile),
        "--calib",
        str(d / "calib.npz"),
        "--qat",
        str(tmp_path / "qat.pt"),
        "-o",
        str(tmp_path / "b"),
        "--json",
    )
    report = json.loads(built.stdout)
    assert report["artifacts"][0]["ranges"] == "qat" and report["qat"]["artifact"] == "torch_int8"
