"""The user's own metric decides the verdict: a bin estimator whose arg-max moves to neighbouring
bins under INT8 fails top-1 agreement, while "within 2 bins of the truth" holds; recovery aims at
the metric and stops as soon as it holds."""

import json

import numpy as np
import pytest

import toolchain
from toolchain.core.errors import EXIT_USER_ERROR

from .conftest import cli, fast_profile
from .models import bin_estimator, bins_of, export

METRICS = """
import numpy as np

def within_2_bins(outputs, labels):
    return float(np.mean(np.abs(outputs.argmax(1) - labels["bin"]) <= 2))

def broken(outputs, labels):
    return np.mean(outputs[:, 999])
"""


@pytest.fixture(scope="module")
def bins(digits_arrays, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bins")
    x_train, x_test, _, _ = digits_arrays
    export(bin_estimator(x_train), x_train, folder / "bins.pt2")
    np.savez(folder / "cal.npz", x=x_train[:256])
    # `bin` for the metric; `y`, the same bins as class labels: the evidence that the logits are a
    # classifier's, judged by top-1 agreement until a metric decides
    np.savez(folder / "val.npz", x=x_test, y=bins_of(x_test), bin=bins_of(x_test))
    (folder / "metrics.py").write_text(METRICS)
    return folder


def _build(bins, tmp_path, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    profile = fast_profile(tmp_path, 256, 594)
    return toolchain.build(
        str(bins / "bins.pt2"), str(profile), tmp_path / "out", bins / "cal.npz", bins / "val.npz", **kwargs
    )


def _most_float_layers(artifact) -> int:
    attempts = (artifact.recovery or {}).get("attempts", [])
    return (
        len(artifact.float_layers)
        if artifact.parity.passed
        else max((len(a["float_layers"]) for a in attempts), default=0)
    )


def test_the_metric_decides_and_recovery_stops_when_it_holds(bins, tmp_path):
    without, _ = _build(bins, tmp_path / "a")
    assert without.metric is None
    with_metric, folder = _build(bins, tmp_path / "b", metric=str(bins / "metrics.py") + ":within_2_bins")
    data = json.loads((folder / "report.json").read_text())
    assert data["metric"]["name"].endswith("metrics.py:within_2_bins") and data["metric"]["fp32"] > 0.8
    assert data["passed"] is True and data["verdict"] == "PASSED"
    for name in ("torch_int8", "onnx_int8"):
        before = next(a for a in without.artifacts if a.name == name)
        after = next(a for a in with_metric.artifacts if a.name == name)
        assert before.recovery["before"]["top1_agreement"] < 0.99  # INT8 moves the arg-max...
        m = after.parity.metric
        assert (
            m["passed"] is True
            and m["drop"] <= 0.01
            and m["value"] == pytest.approx(data["metric"]["fp32"] - m["drop"])
        )
        # ...but top-1 agreement no longer decides
        assert after.parity.passed is True and not after.parity.failures
        assert _most_float_layers(after) < _most_float_layers(before), (
            after.float_layers,
            before.recovery["summary"],
        )
    page = (folder / "report.html").read_text()
    assert page.index("class='metric'") < page.index("<h2>Parity against FP32</h2>")


def test_a_metric_that_raises_is_one_line_with_where(bins, tmp_path):
    r = cli(
        "-q",
        "build",
        str(bins / "bins.pt2"),
        "--target",
        str(fast_profile(tmp_path, 32, 64)),
        "--calib",
        str(bins / "cal.npz"),
        "--val",
        str(bins / "val.npz"),
        "--out",
        str(tmp_path / "out"),
        "--metric",
        f"{bins / 'metrics.py'}:broken",
    )
    assert r.returncode == EXIT_USER_ERROR
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "metric" in lines[0] and "IndexError: index 999 is out of bounds" in lines[0]
    ), r.stderr
    assert "(metrics.py:8)" in lines[0]  # the line of `broken` that raised
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nowhere.py:f", "metric file `nowhere.py` does not exist"),
        ("metrics.py", "must look like FILE.py:function"),
        ("METRICS:missing", "has no function `missing`"),
    ],
)
def test_bad_metric_specs(bins, tmp_path, spec, message):
    spec = spec.replace("METRICS", str(bins / "metrics.py"))
    r = cli("-q", "build", str(bins / "bins.pt2"), "--metric", spec, "--out", str(tmp_path / "out"))
    assert r.returncode == EXIT_USER_ERROR and message in r.stderr and "Traceback" not in r.stderr, r.stderr
