import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")

REPO = Path(__file__).resolve().parent.parent
X86 = REPO / "targets" / "x86_fbgemm.toml"


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The built-in example: a CNN trained on scikit-learn digits, with calib and val data."""
    from toolchain.inputs.examples import write_digits_example

    return write_digits_example(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def digits_arrays():
    from toolchain.inputs.examples import digits_data

    return digits_data()


def write_profile(tmp_path: Path, text: str, base: Path = X86, name: str = "custom.toml") -> Path:
    """A profile file: ``base`` with ``text`` appended (later TOML tables must be new ones)."""
    path = tmp_path / name
    path.write_text(base.read_text() + "\n" + text if base else text)
    return path


XAVIER = REPO / "targets" / "nvidia_xavier.toml"
SNAPDRAGON = REPO / "targets" / "qualcomm_snapdragon.toml"


def fast_profile(
    tmp_path: Path,
    calibration: int = 32,
    validation: int = 16,
    extra: str = "",
    base: Path = X86,
    batch_sizes: str | None = "[1, 2]",
    openvino: bool = False,
    int4: bool = False,
) -> Path:
    """A profile with fewer samples, timed runs and batch sizes: for tests about behaviour, not
    speed (``batch_sizes=None`` keeps the target's). The x86 profile's OpenVINO artifacts (the same
    Q/DQ model as onnx_int8 in another runtime) are left out unless ``openvino``: test_openvino.py
    and the x86 profile's own test build them. So are the 4-bit artifacts (offered beside INT8 to
    Linear-heavy models, the digits CNN among them) unless ``int4``: test_int4.py builds them."""
    text = base.read_text()
    if 'name = "x86_fbgemm"' in text and not openvino:
        text = re.sub(r"\[artifacts\.openvino_\w+\]\n(?:[^\[\n].*\n)*\n?", "", text)
    if not int4:
        text = re.sub(r"\[artifacts\.\w+_int4\]\n(?:[^\[\n].*\n)*\n?", "", text)
    if batch_sizes:
        text = re.sub(r"^batch_sizes = \[[^\]]*\]", f"batch_sizes = {batch_sizes}", text, count=1, flags=re.M)
    text = text.replace("profile_runs = 10", "profile_runs = 3").replace("sweep_runs = 10", "sweep_runs = 3")
    text = text.replace("calibration_samples = 256", f"calibration_samples = {calibration}")
    text = text.replace("validation_samples = 512", f"validation_samples = {validation}")
    text = text.replace("synthetic_samples = 64", f"synthetic_samples = {max(calibration, validation)}")
    text = re.sub(r"^race_runs = .*\n", "", text, flags=re.M)
    text = text.replace("latency_runs = 30", "latency_runs = 3\nrace_runs = 3").replace(
        "warmup_runs = 5", "warmup_runs = 1"
    )
    path = tmp_path / "fast.toml"
    path.write_text(text + "\n" + extra)
    return path


def data_profile(tmp_path: Path, calibration: int = 32, validation: int = 16, keep=("onnx_fp32",)) -> Path:
    """The fast x86 profile with only the artifacts ``keep`` names (onnx_fp32, the quickest to make and
    check, by default): for tests whose subject is the data, the constants, the report or the folder."""
    fast = fast_profile(tmp_path, calibration, validation)
    names = re.findall(r"^\[artifacts\.(\w+)\]", fast.read_text(), flags=re.M)
    return without_artifacts(fast, tmp_path, *(n for n in names if n not in keep))


def without_artifacts(base: Path, tmp_path: Path, *names: str) -> Path:
    """``base`` with the ``[artifacts.NAME]`` tables of ``names`` removed (TOML
    tables hold no blank lines)."""
    text = base.read_text()
    for name in names:
        text = re.sub(rf"\[artifacts\.{name}\]\n(?:[^\[\n].*\n)*", "", text)
    path = tmp_path / f"without-{base.name}"
    path.write_text(text)
    return path


def cli(*args, timeout: int = 600):
    """`toolchain ARGS...` in a fresh process, as a user runs it (stderr not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "toolchain", *args], capture_output=True, text=True, timeout=timeout
    )
