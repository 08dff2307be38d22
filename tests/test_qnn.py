"""Snapdragon NPU: the digits model compiled to a Hexagon (HTP) context on this x86 host, and its
outputs checked against FP32 by running that context through the HTP library here."""

import importlib.util
import json

import onnx
import pytest

import toolchain

from .conftest import SNAPDRAGON, cli, fast_profile, without_artifacts

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime_qnn") is None,
    reason="onnxruntime-qnn is not installed (pip install 'toolchain[qnn]', glibc >= 2.35)",
)


def _profile(tmp_path, validation=64, **settings):
    """The shipped profile's `qnn_int8` alone, its `[stages.compile_qnn]` with ``settings`` changed."""
    import re
    import tomllib

    profile = fast_profile(tmp_path, 64, validation, base=SNAPDRAGON, batch_sizes=None)
    others = [n for n in tomllib.loads(profile.read_text())["artifacts"] if n != "qnn_int8"]
    path = without_artifacts(profile, tmp_path, *others)
    text = path.read_text()
    for key, value in settings.items():
        text, n = re.subn(rf"^{key} = \S+", f"{key} = {value}", text, count=1, flags=re.M)
        assert n == 1, key
    path.write_text(text)
    return path


def test_the_default_snapdragon_profile_ships_the_npu_artifact():
    """In `qualcomm_snapdragon` as shipped: judged like every artifact, on a subset (the emulator runs one
    input at a time), never chosen by host latency (the emulator's, not the phone's)."""
    from toolchain.target import load_target

    profile = load_target("qualcomm_snapdragon")
    spec = profile.artifacts["qnn_int8"]
    assert spec.runtime == "qnn" and spec.stages[-1] == "compile_qnn"
    assert spec.primary is False and 0 < spec.parity_samples < profile.data.validation_samples
    assert profile.stage_options["compile_qnn"].htp_arch == 73


def test_qnn_int8_is_an_htp_context_that_keeps_parity_and_json_stdout_is_json_alone(digits, tmp_path):
    """Built as a script would (`--json`): the QNN SDK prints a line on standard output when it loads
    (`# LIBNATIVE: ...`); it goes to standard error with the log, so standard output parses."""
    folder = tmp_path / "out"
    r = cli(
        "build",
        str(digits["model"]),
        "--target",
        str(_profile(tmp_path, 64, parity_samples=32)),
        "--calib",
        str(digits["calibration"]),
        "--val",
        str(digits["validation"]),
        "--out",
        str(folder),
        "--json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)  # the whole of standard output, nothing before or after
    assert "LIBNATIVE" not in r.stdout
    a = next(a for a in report["artifacts"] if a["name"] == "qnn_int8")
    # the profile's subset, said in the report
    assert a["parity"]["samples"] == 32 and report["data"]["validation"]["samples"] == 64
    assert "qnn_int8: parity on 32 of the 64 validation inputs" in (folder / "report.md").read_text()
    model = onnx.load(str(folder / a["path"]))
    # the whole graph on the HTP, nothing on the CPU
    assert [n.op_type for n in model.graph.node] == ["EPContext"]
    facts = a["stage_facts"]["compile_qnn"]
    assert (
        facts["htp_arch"] == 73 and facts["phone"] == "Snapdragon 8 Gen 2" and facts["context_bytes"] > 1000
    )
    assert "host HTP emulation" in facts["checked_on"]
    assert a["parity"]["passed"] is True and a["parity"]["top1_agreement"] >= 0.99, a["parity"]
    assert a["runtime"] == "qnn" and a["precision"] == "int8"
    assert "host HTP emulation" in (folder / "report.html").read_text()


def test_a_wrong_htp_arch_is_a_config_error_naming_the_valid_values(digits, tmp_path):
    profile = _profile(tmp_path, htp_arch=74)
    r = cli(
        "build",
        str(digits["model"]),
        "--target",
        str(profile),
        "--calib",
        str(digits["calibration"]),
        "--out",
        str(tmp_path / "out"),
    )
    assert (
        r.returncode == 2 and "stages.compile_qnn.htp_arch" in r.stderr and "68, 69, 73, 75, 79" in r.stderr
    ), r.stderr
    assert not (tmp_path / "out").exists()


def test_a16w8_is_built_and_checked_on_the_htp(digits, tmp_path):
    profile = _profile(tmp_path, a16w8="true")
    report, _ = toolchain.build(
        str(digits["model"]), str(profile), tmp_path / "out", digits["calibration"], digits["validation"]
    )
    a = report.artifacts[0]
    assert a.precision == "a16w8" and a.stage_facts["compile_qnn"]["activations"] == "uint16"
    # 16-bit activations: closer to FP32 than INT8
    assert a.parity.passed is True and a.parity.sqnr_db > 30, a.parity


def test_outlier_channels_on_the_htp_are_recovered_by_equalization(digits_arrays, tmp_path):
    """The outlier model of test_recovery: INT8 on the HTP rounds the small channels away (top-1
    agreement ~9 %); 16-bit activations alone reach ~80 %; equalization, tried first, brings 100 %."""
    import numpy as np

    from .models import export, outlier_classifier

    x_train, x_test, y_train, y_test = digits_arrays
    export(outlier_classifier(x_train, y_train), x_train, tmp_path / "outlier.pt2")
    np.savez(tmp_path / "cal.npz", x=x_train[:128])
    np.savez(tmp_path / "val.npz", x=x_test[:64], y=y_test[:64])
    report, _ = toolchain.build(
        str(tmp_path / "outlier.pt2"),
        str(_profile(tmp_path)),
        tmp_path / "out",
        tmp_path / "cal.npz",
        tmp_path / "val.npz",
    )
    a = report.artifacts[0]
    assert a.recovery["before"]["top1_agreement"] < 0.5 and a.recovery["status"] == "recovered", a.recovery[
        "summary"
    ]
    assert (
        a.recovery["attempts"][-1]["fixes"] == ["equalize"]
        and a.precision == "int8"
        and a.parity.passed is True
    )
    assert a.stage_facts["compile_qnn"]["context_bytes"] > 1000


def test_operators_the_htp_refuses_run_on_the_cpu_in_a_labelled_partial_offload(tmp_path):
    """The PESTO-like pitch CNN: the HTP takes its convolutions and head but not LayerNormalization over
    (channels, frequency). The whole graph fails; the partial offload keeps those two nodes in float
    on the phone's CPU, says so, and is judged like any artifact. Without the fallback: skipped,
    naming the setting."""
    import numpy as np

    from .models import export, pitch_spectra, spectral_pitch

    x, y = pitch_spectra(1024, 0)
    x_val, y_val = pitch_spectra(64, 1)
    export(spectral_pitch(x, y, epochs=12), x, tmp_path / "pitch.pt2")
    np.savez(tmp_path / "cal.npz", x=x[:64])
    np.savez(tmp_path / "val.npz", x=x_val, y=y_val)
    report, folder = toolchain.build(
        str(tmp_path / "pitch.pt2"),
        str(_profile(tmp_path)),
        tmp_path / "out",
        tmp_path / "cal.npz",
        tmp_path / "val.npz",
    )
    (a,) = report.artifacts
    facts = a.stage_facts["compile_qnn"]
    assert facts["offload"] == "partial" and facts["cpu_ops"] == {"LayerNormalization": 2}, facts
    assert facts["htp_nodes"] > facts["cpu_nodes"] == 2
    graph = onnx.load(str(folder / a.path)).graph
    ops = [n.op_type for n in graph.node]
    assert "EPContext" in ops and ops.count("LayerNormalization") == 2
    weights = {t.name for t in graph.initializer}
    for norm in (n for n in graph.node if n.op_type == "LayerNormalization"):
        assert set(norm.input[1:]) <= weights  # the CPU's nodes keep float weights: not quantized
    assert a.parity.passed is True and a.parity.top1_agreement >= 0.98, a.parity
    assert "int8 (HTP 5/7 nodes)" in (folder / "report.md").read_text()

    with pytest.raises(toolchain.ToolchainError) as refused:
        toolchain.build(
            str(tmp_path / "pitch.pt2"),
            str(_profile(tmp_path, cpu_fallback="false")),
            tmp_path / "whole",
            tmp_path / "cal.npz",
            tmp_path / "val.npz",
        )
    assert "qnn_int8: compile_qnn: the HTP cannot take this model (cpu_fallback = false)" in str(
        refused.value
    )
