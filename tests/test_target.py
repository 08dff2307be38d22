"""Target profiles: every mistake names the file, the key path and the valid values."""

import re

import pytest

from toolchain.core.errors import ConfigError
from toolchain.stages.quantize_onnx import QuantizeOnnxOptions
from toolchain.target import builtin_targets, load_target, parse_target

from .conftest import SNAPDRAGON, X86, write_profile
from .conftest import XAVIER as XAVIER_PROFILE


def test_builtin_x86_profile_loads_with_its_options():
    t = load_target("x86_fbgemm")
    assert t.name == "x86_fbgemm"
    assert set(t.artifacts) == {
        "torch_int8",
        "onnx_fp32",
        "onnx_int8",
        "onnx_int8_dynamic",
        "torch_int8_dynamic",
        "torch_bf16",
        "torchscript_fp32",
        "openvino_int8",
        "openvino_int8_nncf",
        "openvino_fp32",
        "openvino_bf16",
        "onnx_int4",
    }
    assert not t.artifacts["openvino_fp32"].primary and t.artifacts["openvino_int8"].primary
    assert t.stage_options["quantize_onnx"] == QuantizeOnnxOptions(
        calibration="minmax", per_channel=True, activations="uint8", weights="int8"
    )
    assert t.data.calibration_samples == 256
    assert "x86_fbgemm" in builtin_targets()


def test_target_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(X86.read_text())
    assert load_target(str(path)).source == str(path)


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown target `nvidia_xavierr`; valid: .*x86_fbgemm"):
        load_target("nvidia_xavierr")


def _expect(tmp_path, text, pattern):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as info:
        parse_target(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_malformed_toml(tmp_path):
    _expect(tmp_path, "name = \n[[", r"not valid TOML")


def test_unknown_key_names_the_full_path(tmp_path):
    text = X86.read_text().replace(
        "[stages.quantize_torch]\n", "[stages.quantize_torch]\nper_chanel = true\n"
    )
    _expect(
        tmp_path, text, r"unknown key `stages\.quantize_torch\.per_chanel`; valid keys: engine, calibration"
    )


def test_bad_choice_lists_valid_values(tmp_path):
    text = X86.read_text().replace('calibration = "minmax"', 'calibration = "kl"')
    _expect(
        tmp_path,
        text,
        re.escape("`stages.quantize_onnx.calibration` must be one of minmax, entropy, percentile (got 'kl')"),
    )


def test_wrong_type(tmp_path):
    text = X86.read_text().replace("threads = 2", 'threads = "two"')
    _expect(tmp_path, text, r"`runtime\.threads` must be an integer")


def test_unknown_stage_in_an_artifact(tmp_path):
    text = X86.read_text().replace('"fuse", "quantize_torch"', '"fusion", "quantize_torch"')
    _expect(tmp_path, text, r"`artifacts\.torch_int8\.stages\[0\]` = 'fusion' is not a stage; valid: .*fuse")


def test_unknown_onnxoptimizer_pass(tmp_path):
    text = X86.read_text().replace('"eliminate_deadend",', '"eliminate_everything",')
    _expect(
        tmp_path,
        text,
        r"`stages\.onnx_passes\.passes\[0\]` = 'eliminate_everything' is not an onnxoptimizer pass; "
        r"valid: .*fuse_bn_into_conv",
    )


def test_non_positive_counts_are_refused(tmp_path):
    text = X86.read_text().replace("calibration_samples = 256", "calibration_samples = 0")
    _expect(tmp_path, text, r"`data\.calibration_samples` must be at least 1")
    text = SNAPDRAGON.read_text().replace("parity_samples = 128", "parity_samples = -1")
    _expect(tmp_path, text, r"`artifacts\.qnn_int8\.parity_samples` must be 0 \(all\) or more \(got -1\)")


def test_profile_without_artifacts(tmp_path):
    _expect(tmp_path, 'name = "empty"\n', r"`artifacts` must name at least one artifact")


def test_quantize_outputs_off_needs_op_types(tmp_path):
    text = X86.read_text().replace('activations = "uint8"', 'activations = "uint8"\nquantize_outputs = false')
    _expect(
        tmp_path,
        text,
        r"`stages\.quantize_onnx\.quantize_outputs` = false needs `stages\.quantize_onnx\.op_types`",
    )


def test_targets_verbose_is_toml_with_every_setting():
    import subprocess
    import sys
    import tomllib

    r = subprocess.run(
        [sys.executable, "-m", "toolchain", "targets", "-v"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    header, *blocks = re.split(r"\n(?=# (?!file:)\w+: )", r.stdout)
    # what can run here
    assert header.startswith("# this machine (toolchain doctor):") and "#   quantize_onnx " in header
    assert len(blocks) == len(builtin_targets())
    for block in blocks:
        parsed = tomllib.loads(block)  # a whole target's block is TOML (its heading lines are comments)
        t = load_target(parsed["name"])
        assert parsed["parity"]["min_top1_agreement"] == t.parity.min_top1_agreement
        assert tuple(parsed["runtime"]["batch_sizes"]) == t.runtime.batch_sizes
        assert (
            set(parsed["artifacts"]) == set(t.artifacts)
            and parsed["recovery"]["max_float_layers"] == t.recovery.max_float_layers
        )
        used = {s for a in t.artifacts.values() for s in a.stages}
        assert set(parsed["stages"]) == used  # every stage's options, defaults filled in
    assert 'isa = "avx2"' in r.stdout  # x86_fbgemm's deployment CPU


def test_listing_targets_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; from click.testing import CliRunner; from toolchain.cli import main; "
        "r = CliRunner().invoke(main, ['targets']); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_precision_thresholds_replace_the_base_for_that_precision_only(tmp_path):
    t = load_target(
        str(write_profile(tmp_path, "[parity.precisions.int8]\nmin_sqnr_db = 21.5\n", base=XAVIER_PROFILE))
    )
    assert t.parity.for_precision("int8").min_sqnr_db == 21.5
    assert (
        t.parity.for_precision("fp16").min_sqnr_db == 35.0
        and t.parity.for_precision("fp16").min_top1_agreement == 0.99
    )
    assert t.parity.for_precision("fp32").min_sqnr_db == t.parity.min_sqnr_db == 15.0
    with pytest.raises(
        ConfigError, match=r"`parity\.precisions\.fp8` is not a precision; valid: fp32, fp16, bf16, int8"
    ):
        load_target(
            str(write_profile(tmp_path, "[parity.precisions.fp8]\nmin_sqnr_db = 1\n", name="bad.toml"))
        )
    with pytest.raises(ConfigError, match=r"unknown key `parity\.precisions\.bf16\.min_snr`"):
        load_target(
            str(
                write_profile(
                    tmp_path, "[parity.precisions.bf16]\nmin_snr = 1\n", name="bad2.toml", base=XAVIER_PROFILE
                )
            )
        )
