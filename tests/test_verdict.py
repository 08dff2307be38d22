"""The verdict can be trusted on any model: every output judged, NaN never passes, data kept
apart, random weights not called a pass, model files known by content, errors that say why."""

import json

import numpy as np
import pytest
import torch

import toolchain
from toolchain.core.errors import EXIT_NOT_JUDGED, EXIT_USER_ERROR, DataError, reason
from toolchain.target import ParityThresholds
from toolchain.verdict.parity import compare, resolve_roles

from .conftest import XAVIER, cli, data_profile, fast_profile, without_artifacts
from .models import TwoHeads, register_test_stages, two_heads_with_outlier_channels

T = ParityThresholds(min_sqnr_db=20.0, min_cosine=0.99, min_top1_agreement=0.99, max_accuracy_drop=0.01)
register_test_stages()


# --- parity on arrays -------------------------------------------------------------------------


def test_nan_outputs_fail_whatever_the_thresholds():
    ref = np.random.default_rng(0).standard_normal((8, 5))
    out = ref.copy()
    out[3, 2] = np.nan
    for thresholds in (T, None):  # judged or not, a NaN is never noise
        p = compare(ref, out, None, thresholds)
        assert p.passed is False
        assert p.failures == ("1 NaN or infinite values (first in sample 3)",)
    all_nan = compare(ref, np.full_like(ref, np.nan), None, T)
    assert all_nan.passed is False and "40 NaN" in all_nan.failures[0]


def test_every_output_is_judged_and_named():
    rng = np.random.default_rng(1)
    logits, box = rng.standard_normal((16, 10)), rng.standard_normal((16, 4))
    roles = resolve_roles([logits, box], ["logits", "box"], {"logits": "classification"})
    assert [(r.role, r.inferred) for r in roles] == [("classification", False), ("regression", True)]
    p = compare([logits, box], [logits, box + rng.standard_normal((16, 4))], None, T, roles)
    assert p.passed is False and [o.passed for o in p.outputs] == [True, False]
    assert p.failures and all(f.startswith("output 1 (box): ") for f in p.failures)
    # a box's arg-max is reported (a regression's top-1), never judged: its failures are SQNR and cosine
    assert p.outputs[1].top1_agreement is not None and not [f for f in p.failures if "top-1" in f]
    assert p.sqnr_db == p.outputs[1].sqnr_db  # the aggregate is the worst output


def test_several_outputs_are_not_guessed_to_be_classifiers():
    two = [np.zeros((4, 4)), np.zeros((4, 10))]
    assert [r.role for r in resolve_roles(two, ["0", "1"], {})] == ["regression", "regression"]
    # one (N, C) output is a classifier only with labels that fit it: scores alone are no evidence
    assert resolve_roles([np.zeros((4, 10))], ["0"], {})[0].role == "regression"
    assert resolve_roles([np.eye(10)[:4] * 5], ["0"], {}, np.arange(4))[0].role == "classification"
    with pytest.raises(
        DataError, match="parity output `scores` is not an output of the model; its outputs are: 0, 1"
    ):
        resolve_roles(two, ["0", "1"], {"scores": "classification"})


def test_missing_output_and_changed_shape_fail():
    ref = [np.ones((4, 3)), np.ones((4, 2))]
    assert compare(ref, ref[:1], None, None).passed is False
    p = compare(ref, [np.ones((4, 3)), np.ones((4, 3))], None, None)
    assert p.passed is False and "shape 4x3 differs from FP32's 4x2" in p.failures[0]


def test_probabilities_and_embeddings_have_their_own_metrics():
    ref = np.full((10, 4), 0.25)
    out = ref.copy()
    out[0] = [0.4, 0.2, 0.2, 0.2]  # 0.15 off in one place: a bad probability, high SQNR anyway
    roles = resolve_roles([ref], ["0"], {"0": "probabilities"})
    p = compare(ref, out, None, T, roles)
    assert p.passed is False and any("max probability error 0.1500 > 0.05" in f for f in p.failures)
    emb = np.random.default_rng(2).standard_normal((10, 8))
    roles = resolve_roles([emb], ["0"], {"0": "embedding"})
    assert compare(emb, emb * 3.0, None, T, roles).passed is True  # scale does not matter to an embedding


def test_reason_keeps_the_cause_of_a_torchscript_failure():
    @torch.jit.script
    def joined(a, b):
        return torch.cat([a, b], dim=1)

    with pytest.raises(Exception) as e:
        joined(torch.zeros(2, 3), torch.zeros(3, 3))
    assert str(e.value).startswith("The following operation failed in the TorchScript interpreter")
    assert reason(e.value).startswith("RuntimeError: Sizes of tensors must match"), reason(e.value)


# --- builds ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_heads(digits_arrays, tmp_path_factory):
    """A classifier + regression model trained on digits, rescaled so that INT8 erases its regression head."""
    folder = tmp_path_factory.mktemp("heads")
    x_train, x_test, y_train, y_test = digits_arrays
    model = two_heads_with_outlier_channels(x_train, y_train)
    torch.export.save(
        torch.export.export(
            model,
            (torch.from_numpy(x_train[:2]),),
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        ),
        folder / "heads.pt2",
    )
    np.savez(folder / "cal.npz", x=x_train[:128])
    np.savez(folder / "val.npz", x=x_test[:256], y=y_test[:256])
    return folder


def test_a_broken_second_output_fails_the_artifact(two_heads, tmp_path):
    # recovery would fix it (tests/test_recovery.py): judge the first build
    no_recovery = "[recovery]\nenabled = false\n"
    report, folder = toolchain.build(
        str(two_heads / "heads.pt2"),
        str(fast_profile(tmp_path, 128, 256, no_recovery)),
        tmp_path / "out",
        two_heads / "cal.npz",
        two_heads / "val.npz",
        outputs={"0": "classification", "1": "regression"},
    )
    data = json.loads((folder / "report.json").read_text())
    assert data["reference"]["accuracy"] > 0.9
    assert [(o["name"], o["role"], o["role_inferred"]) for o in data["model"]["outputs"]] == [
        ("0", "classification", False),
        ("1", "regression", False),
    ]
    by_name = {a["name"]: a for a in data["artifacts"]}
    assert by_name["onnx_fp32"]["parity"]["passed"] is True  # FP32 ONNX keeps both outputs
    for name in ("torch_int8", "onnx_int8"):
        outputs = by_name[name]["parity"]["outputs"]
        assert [o["index"] for o in outputs] == [0, 1]
        assert outputs[0]["passed"] is True, outputs[0]  # the classifier survives INT8...
        assert outputs[0]["top1_agreement"] >= 0.99
        # ...its second head does not
        assert outputs[1]["passed"] is False and outputs[1]["top1_agreement"] is None, outputs[1]
        assert by_name[name]["parity"]["passed"] is False
        assert any(f.startswith("output 1: SQNR") for f in by_name[name]["parity"]["failures"])
    assert data["passed"] is False and data["verdict"] == "FAILED parity"


def test_nan_injected_by_a_stage_fails_parity(digits, tmp_path):
    profile = fast_profile(
        tmp_path,
        extra="""
[artifacts.onnx_poisoned]
stages = ["export_onnx", "onnx_passes", "poison_onnx"]
runtime = "onnxruntime"
""",
    )
    report, folder = toolchain.build(
        str(digits["model"]), str(profile), tmp_path / "out", digits["calibration"], digits["validation"]
    )
    data = json.loads((folder / "report.json").read_text())
    poisoned = next(a for a in data["artifacts"] if a["name"] == "onnx_poisoned")
    assert poisoned["parity"]["passed"] is False and poisoned["primary"] is False
    assert "NaN or infinite values (first in sample 0)" in poisoned["parity"]["failures"][0]
    assert poisoned["parity"]["sqnr_db"] == "nan" and poisoned["parity"]["outputs"][0]["nonfinite"] > 0
    assert data["passed"] is False
    assert "null" not in (folder / "report.json").read_text().split('"sqnr_db"')[1][:10]


def _build_with_extra_artifact(digits, tmp_path, name: str, last_stage: str):
    """The digits build with one more ONNX artifact whose chain ends in
    ``last_stage``; returns its skip reason."""
    profile = fast_profile(
        tmp_path,
        extra=f"""
[artifacts.{name}]
stages = ["export_onnx", "onnx_passes", "{last_stage}"]
runtime = "onnxruntime"
""",
    )
    report, folder = toolchain.build(
        str(digits["model"]), str(profile), tmp_path / "out", digits["calibration"], digits["validation"]
    )
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert set(skipped) == {name} and not (folder / f"{name}.onnx").exists()  # not shipped
    assert {a.name for a in report.artifacts} == {
        "torch_int8",
        "onnx_fp32",
        "onnx_int8",
    } and report.passed  # the others are
    return skipped[name]


def test_a_crash_inside_a_stage_costs_only_its_artifact(digits, tmp_path):
    why = _build_with_extra_artifact(digits, tmp_path, "onnx_crashing", "crash_onnx")
    assert why == "crash_onnx crashed: AttributeError: 'int' object has no attribute 'numel'"


def test_an_artifact_its_runtime_refuses_is_skipped_with_the_runtime_s_reason(digits, tmp_path):
    """ONNX Runtime raises its own exception types (here NotImplemented for an unknown operator)."""
    why = _build_with_extra_artifact(digits, tmp_path, "onnx_refused", "unknown_op_onnx")
    assert why.startswith("onnxruntime could not run the built file: ") and "NoSuchOp" in why


def test_fp32_nan_is_a_user_error(tmp_path):
    class Sqrt(torch.nn.Module):
        def forward(self, x):
            return torch.sqrt(x.flatten(1).sum(1, keepdim=True) - 1e6)

    torch.jit.save(torch.jit.script(Sqrt()), str(tmp_path / "sqrt.pt"))
    r = cli(
        "build",
        str(tmp_path / "sqrt.pt"),
        "--input-shape",
        "1x4",
        "--target",
        str(fast_profile(tmp_path)),
        "--out",
        str(tmp_path / "out"),
    )
    assert r.returncode == EXIT_USER_ERROR, r.stderr
    assert (
        "the FP32 model's output 0 has 32 NaN or infinite values" in r.stderr and "Traceback" not in r.stderr
    )
    assert not (tmp_path / "out").exists()


def test_calibration_data_as_validation_is_flagged(digits, tmp_path):
    report, _ = toolchain.build(
        str(digits["model"]),
        str(data_profile(tmp_path, 32, 32)),
        tmp_path / "out",
        digits["calibration"],
        digits["calibration"],
    )
    data = report.to_json()
    assert data["data"]["overlap_samples"] == 32 and data["parity_inputs"] == "calibration"
    assert any("32 of the 32 validation samples are also calibration samples" in w for w in data["warnings"])


def test_without_val_a_disjoint_part_of_calib_is_held_out(digits, tmp_path):
    report, _ = toolchain.build(
        str(digits["model"]), str(data_profile(tmp_path, 128, 64)), tmp_path / "out", digits["calibration"]
    )
    data = report.to_json()
    cal, val = data["data"]["calibration"], data["data"]["validation"]
    assert (cal["samples"], val["samples"]) == (96, 32) and val["held_out"] is True
    assert data["data"]["overlap_samples"] == 0 and data["parity_inputs"] == "data"
    assert any(
        "parity runs on 32 samples held out from --calib, which calibrates on the other 96" in w
        for w in data["warnings"]
    )


def test_random_weights_are_not_judged(tmp_path):
    # the verdict is the build's, whatever its artifacts and target: Xavier's two ONNX files keep this
    # CLI build short, and its `--json` stdout is parsed as a script would (x86's and Snapdragon's are
    # in test_build_x86 and test_qnn)
    base = without_artifacts(XAVIER, tmp_path, "onnx_fp16")
    r = cli(
        "build",
        "torchvision:squeezenet1_1",
        "--input-shape",
        "1x3x64x64",
        "--target",
        str(fast_profile(tmp_path, 8, 8, base=base, batch_sizes=None)),
        "--out",
        str(tmp_path / "out"),
        "--json",
    )
    assert r.returncode == EXIT_NOT_JUDGED, r.stderr
    data = json.loads(r.stdout)
    assert (
        data["passed"] is None
        and data["verdict"] == "NOT JUDGED (random weights)"
        and data["parity_judged"] is False
    )
    assert {a["name"] for a in data["artifacts"]} == {"onnx_fp32", "onnx_int8_qdq"}
    assert all(a["parity"]["passed"] is None for a in data["artifacts"])


def test_model_files_are_recognised_by_content(digits, tmp_path):
    from toolchain.inputs.load import load_model

    scripted = tmp_path / "vad.jit"
    torch.jit.save(torch.jit.script(TwoHeads()), str(scripted))
    assert str(load_model(str(scripted)).artifact.kind) == "torchscript"
    exported = tmp_path / "model.bin"
    exported.write_bytes(digits["model"].read_bytes())
    assert str(load_model(str(exported)).artifact.kind) == "torch.export.ExportedProgram"


def test_damaged_export_is_one_line_with_the_cause_torch_only_logged(digits, tmp_path):
    """torch.export.load logs the real error as a traceback and raises "check the warnings above"."""
    import zipfile

    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(digits["model"]) as src, zipfile.ZipFile(bad, "w") as out:
        for name in src.namelist():
            data = src.read(name)
            out.writestr(name, data[: len(data) // 2] if name.endswith("weights/weight_0") else data)
    # -q: errors only, so torch's own logs would show
    r = cli("-q", "build", str(bad), "--out", str(tmp_path / "out"))
    assert r.returncode == EXIT_USER_ERROR
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert (
        "not a readable torch.export archive: RuntimeError: setStorage" in lines[0]
        and "out of bounds" in lines[0]
    )


def test_frozen_torchscript_models_with_other_weights_are_other_artifacts():
    """A frozen module's weights are graph constants (no state_dict, the same code): the pipeline's
    cache and the manifest tell such models apart by their saved archive, so a variant that changes
    only weights (recovery's smoothing, equalization, bias correction on a .ptl) is measured itself."""
    from toolchain.core.artifact import Artifact, Kind

    def frozen(seed):
        torch.manual_seed(seed)
        return torch.jit.freeze(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()))

    a, b = frozen(0), frozen(1)
    assert a.code == b.code and not a.state_dict()  # what the hash used to see
    digests = [Artifact(kind=Kind.TORCHSCRIPT, precision="fp32", model=m).sha256 for m in (a, b, a)]
    assert digests[0] != digests[1] and digests[0] == digests[2]


def test_a_parity_subset_keeps_every_class_and_rescores_fp32_on_it():
    """`artifacts.NAME.parity_samples`: a file sorted by class still gives every class to the subset, and
    FP32's accuracy and metric score are taken on the same inputs the artifact is judged on."""
    from toolchain.core.dataset import Dataset
    from toolchain.inputs.prepare import Inputs
    from toolchain.verdict.expected import Expected, parity_subset
    from toolchain.verdict.metric import Metric

    y = np.repeat(np.arange(8), 64)  # 512 samples sorted by class
    logits = np.eye(8, dtype=np.float32)[y] + 0.1
    logits[y == 7] = np.roll(logits[y == 7], 1, axis=1)  # FP32 is wrong on every sample of the last class
    inputs = Inputs((1, 8), Dataset(logits, y, "cal"), Dataset(logits, y, "val", labels={"y": y}), ())
    roles = resolve_roles([logits], ["logits"], {}, y)
    accuracy = lambda outputs, labels: float(np.mean(outputs.argmax(1) == labels))
    expected = Expected([logits], roles, 7 / 8, Metric("m.py:accuracy", accuracy, 7 / 8))
    part_inputs, part = parity_subset(inputs, expected, 128)
    # evenly spaced
    assert len(part_inputs.validation.x) == 128 and set(part_inputs.validation.y) == set(range(8))
    assert np.array_equal(part.outputs[0], part_inputs.validation.x)  # FP32's outputs on the same samples
    assert part.accuracy == pytest.approx(7 / 8) and part.metric.fp32 == pytest.approx(7 / 8)
    assert (
        parity_subset(inputs, expected, 0) == (inputs, expected)
        and parity_subset(inputs, expected, 512)[1] is expected
    )
    part_inputs, part = parity_subset(inputs, expected, 8)
    assert part_inputs.validation.y.tolist() == list(range(8)) and part.metric.fp32 == pytest.approx(7 / 8)
